"""Run `lorafleet.train.train` in this process and print its peak RSS net of the process's
baseline, as JSON. The baseline is taken after the same job ran once on a tiny model (WARM_DIR),
so libraries, kernels and allocator pools touched on first use count as baseline, not as the
model's memory. Used by test_memory.py in a subprocess: RSS is per process.

    python peak_rss_worker.py MODEL_DIR WARM_DIR DATA OUT METHOD [DTYPE]
"""
import json
import sys
from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    model_dir, warm_dir, data, out, method = sys.argv[1:6]
    dtype = sys.argv[6] if len(sys.argv) > 6 else "auto"
    import torch

    import lorafleet.quant  # noqa: F401  (imports are baseline, not the model's memory)
    from lorafleet.train import TrainConfig, train
    torch.set_num_threads(1)

    def run(model: str, run_out: str) -> None:
        train(TrainConfig.from_flat(model=model, data=data, out=run_out, method=method,
                                    dtype=dtype, steps=1, batch_size=1, max_len=32,
                                    targets="all-linear", device="cpu"))

    run(warm_dir, out + "-warm")
    # Linux >= 4.0: reset the high-water mark VmHWM to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = status_kib("VmRSS")
    run(model_dir, out)
    print(json.dumps({"net_mib": (status_kib("VmHWM") - baseline) / 1024,
                      "peak_mib": status_kib("VmHWM") / 1024}))


if __name__ == "__main__":
    main()
