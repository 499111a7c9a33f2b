"""Shared pieces of the benchmark: model sizes built from a config, an offline tokenizer, memory and FLOP counters.

Nothing here is downloaded: every model is a `transformers.LlamaConfig` with random weights, every tokenizer is built
in memory. Counters say exactly what they count (benchmarks/benchmarks/README.md).

Shape legend: B sequences (prompts × G), S = P + T positions per sequence, V vocabulary, h hidden size, L layers.
"""
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import threading
import time

import torch

# Llama shapes, untied embeddings (as train.py's embedded model). Odd vocabularies (127, 50257 = GPT-2's) split
# unevenly over 2 FSDP ranks, so the ledger-vs-measured table shows FSDP2's padding.
SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=127, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "S": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4),
    "M": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4),
    "L": dict(vocab_size=50257, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12),
}
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*=# ")


def machine() -> dict:
    """The CPU, its cores, torch and Python, the date, the load average at start (other jobs' load), the GPU."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.date.today().isoformat(), "loadavg_start": os.getloadavg()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def llama_config(size: str, max_positions: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=max_positions, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_tokenizer(vocab_size: int):
    """A one-character-per-token tokenizer with exactly `vocab_size` ids: train.py's characters, then filler characters
    from U+4E00 on. Decoding then re-encoding a completion gives back the same ids, so the reward model scores
    sequences as long as the policy's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    filler = (chr(c) for c in range(0x4E00, 0x110000) if not 0xD800 <= c <= 0xDFFF)  # skip surrogates
    tokens = SPECIALS + CHARS + [next(filler) for _ in range(vocab_size - len(SPECIALS) - len(CHARS))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def save_model(size: str, path: str, seed: int = 0) -> str:
    """Random-weight Llama of `size` and its tokenizer, saved to `path` (reused) for models.load_full_model."""
    from transformers import LlamaForCausalLM

    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(seed)
        LlamaForCausalLM(llama_config(size)).save_pretrained(path)
        make_tokenizer(SIZES[size]["vocab_size"]).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs (nanoGPT's estimate_mfu convention, PaLM appendix B)
# ---------------------------------------------------------------------------------------------------------------------
def matmul_params(model: torch.nn.Module) -> int:
    """N_mm: weights that multiply activations (every nn.Linear: attention, MLP, LM head or value/score head).
    The embedding is a lookup, not a matmul, so it is left out (as in nanoGPT's estimate_mfu)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops(*, n_matmul: int, n_layers: int, hidden: int, seq_len: int, n_tokens: int) -> int:
    """Forward + backward FLOPs of one model over `n_tokens` positions of sequences of `seq_len` positions."""
    # 6·N per token: 2 (multiply-add) × N forward, 4·N backward (gradients of activations and of weights)
    dense = 6 * n_matmul
    # 12·L·h·S per token: QKᵀ and attention·V, 2·2·S·h forward per layer, ×3 with backward (full S², no causal halving)
    attention = 12 * n_layers * hidden * seq_len
    return (dense + attention) * n_tokens


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> dict:
    """Best achieved FLOP/s of an n×n @ n×n matmul (fp32 on CPU with this process's threads; bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (thread pool, cuBLAS handles)
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    out = {"n": n, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "flops_per_s": 2 * n**3 / best}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["nominal_bf16_dense_flops_per_s"] = nominal_gpu_peak(out["device_name"])
    return out


def nominal_gpu_peak(name: str) -> float | None:
    """Vendor datasheet dense bf16 tensor-core peak (no sparsity); None for a device not listed."""
    table = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
    return next((v for k, v in table.items() if k in name), None)


# ---------------------------------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_tensors(models: list, optimizers: list) -> dict[str, list[torch.Tensor]]:
    """Every tensor of the models' state on this rank, by kind (local shards of DTensors)."""
    out = {"params": [], "grads": [], "optimizer": [], "buffers": []}
    for m in filter(None, models):
        for p in m.parameters():
            out["params"].append(local(p))
            if p.grad is not None:
                out["grads"].append(local(p.grad))
        out["buffers"] += [local(b) for b in m.buffers()]
    for o in filter(None, optimizers):
        out["optimizer"] += [local(v) for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return out


def storage_bytes(tensors: list[torch.Tensor], seen: set | None = None) -> int:
    """Σ nbytes of the distinct storages behind `tensors`: what the allocator holds for them, padding included.
    FSDP2 keeps each sharded parameter in a padded buffer and a whole unit's gradients in one flat buffer."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        key = (t.device.type, st.data_ptr())
        if key not in seen and st.data_ptr() != 0:
            seen.add(key)
            total += st.nbytes()
    return total


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Σ numel · element_size: the bytes the tensors themselves address (no padding, no sharing)."""
    return sum(t.numel() * t.element_size() for t in tensors)


class PeakBytes:
    """Peak bytes during a block: `base` (the bytes the caller counts as live at entry) + the high-water mark of what is
    allocated inside the block. CUDA: max_memory_allocated − memory_allocated at entry. CPU: the running sum of
    torch.profiler's allocation/free events (profile_memory=True), i.e. every allocation by PyTorch's CPU allocator on
    this thread, storage resizes included. Not counted on CPU: memory outside PyTorch's allocator (Python objects,
    gloo's internal buffers, BLAS scratch)."""

    def __init__(self, device: torch.device, base: int = 0):
        self.device, self.base, self.peak = device, base, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.at_entry = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = self.base + torch.cuda.max_memory_allocated(self.device) - self.at_entry
            return False
        self.prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        running = high = 0
        for _, nbytes in events:  # + for an allocation, − for a free
            running += nbytes
            high = max(high, running)
        self.peak = self.base + high
        return False


def run_measuring_rss(cmd: list[str], **popen) -> dict:
    """Run cmd under /usr/bin/time -v (Linux), its resident memory read from outside two ways: time's "Maximum resident
    set size" (the kernel's high-water mark, after exit) and the largest VmRSS of time's children seen by polling
    /proc every 20 ms (a lower bound, to within a few pages). Returns returncode, stdout, stderr, wall_s, rss_time_gib,
    rss_polled_gib."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    peak_kb, stop = [0], threading.Event()

    def poll():
        while not stop.wait(0.02):
            total = 0
            try:
                for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
                    found = re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{pid}/status").read())
                    total += int(found.group(1)) if found else 0
            except OSError:  # a child that just exited
                pass
            peak_kb[0] = max(peak_kb[0], total)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = proc.communicate()
    stop.set()
    poller.join()
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "wall_s": time.perf_counter() - t0,
            "rss_time_gib": int(found.group(1)) / 2**20 if found else None, "rss_polled_gib": peak_kb[0] / 2**20}


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Aligned text table: columns are (key, header); numbers right-aligned, text left-aligned."""
    cells = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    numeric = [all(_is_num(r.get(k)) for r in rows) for k, _ in columns]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_num(v) -> bool:
    return v is None or isinstance(v, (int, float))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def median(xs: list[float]) -> float:
    return statistics.median(xs)
