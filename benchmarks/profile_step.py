"""Where a LeNet-class training step spends its time, layer by layer (fastconv only).

    python benchmarks/profile_step.py [--threads 2] [--batch 64]

Wraps every layer's forward and backward with a timer, runs warm steps, prints ms per step.
"""

import argparse
import time

import fastconv as fc
from fastconv import bench
from fastconv.nn import layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=fc.get_num_threads())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    fc.set_num_threads(args.threads)
    step = bench._model_case("LeNet", args.batch, "train step").make("fastconv")
    spent = {}

    def timed(cls, name):
        original = getattr(cls, name)

        def wrapper(self, *a, **k):
            start = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                key = f"{cls.__name__}.{name}"
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start

        setattr(cls, name, wrapper)

    for cls in (layers.Conv2d, layers.MaxPool2d, layers.ReLU, layers.Linear, layers.Flatten):
        timed(cls, "forward")
        timed(cls, "backward")
    timed(layers.Conv2d, "forward_pooled")  # Sequential's fused Conv2d + MaxPool2d forward
    for _ in range(5):
        step()
    spent.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - start) / args.steps * 1e3
    print(f"step: {total:.2f} ms (batch {args.batch}, {args.threads} threads)")
    for key, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<22} {seconds / args.steps * 1e3:6.2f} ms")
    print(
        f"  {'rest (loss, optimiser)':<22} {total - sum(spent.values()) / args.steps * 1e3:6.2f} ms"
    )


if __name__ == "__main__":
    main()
