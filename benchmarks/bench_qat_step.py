"""QAT step cost: one training step (forward, backward, optimizer) with and without fake quantization.

Measured side by side in one process, interleaved, so machine noise hits both alike:
  - digits CNN at batch 32 and 256, ResNet-18-style at batch 8 (3×224×224);
  - ours: the default plan (LSQ, per-channel weights, first/last at 8 bits) after calibration;
  - torch.ao's eager QAT (fused Conv-BN-ReLU modules, default fbgemm QAT qconfig) on the same model.
Prints median step times and the QAT/FP32 ratios. Targets: ours ≤ 1.5 at batch 32, ≤ 1.3 at 256.

    python benchmarks/bench_qat_step.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from qat_core import library, runner, train, zoo
from qat_core.config import DataConfig
from qat_core.prepare import prepare

warnings.filterwarnings("ignore")


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One training step with the optimizer our fine-tune uses (fused Adam; LSQ steps in their own groups)."""
    opt = train.make_optimizer(model, "adam", 1e-4, 0.0)
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def torch_ao_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.ao eager QAT: fuse conv+bn(+relu) pairs in our Sequential blocks, fbgemm QAT qconfig."""
    from torch.ao.quantization import QuantStub, fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    model = copy.deepcopy(model).train()
    for mod in model.modules():
        if isinstance(mod, nn.Sequential) and "conv" in mod._modules and "bn" in mod._modules:
            group = ["conv", "bn"] + (["relu"] if "relu" in mod._modules else [])
            fuse_modules_qat(mod, [group], inplace=True)
    wrapped = nn.Sequential(QuantStub(), model)
    wrapped.qconfig = get_default_qat_qconfig("fbgemm")
    prepare_qat(wrapped, inplace=True)
    wrapped(example)
    return wrapped


def measure(steps: dict[str, callable], repeats: int, inner: int) -> dict[str, float]:
    for fn in steps.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):  # interleaved rounds
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def case(model_id: str, batch: int, repeats: int, inner: int) -> None:
    torch.manual_seed(0)
    entry = zoo.MODELS[model_id]
    data = entry.data(DataConfig())
    fp32 = entry.model(data)
    x = data.train_x[:batch]
    if len(x) < batch:
        x = x.repeat((batch + len(x) - 1) // len(x), *[1] * (x.dim() - 1))[:batch]
    y = torch.randint(0, data.num_classes, (batch,))
    config = runner.default_config(model_id) if model_id.startswith("digits") else None
    plan = config.plan if config else runner.default_config("digits-cnn").plan.model_copy(update={"overrides": {}})
    ours = prepare(fp32, plan, x[:2])
    train.calibrate(ours, [(x, y)], 1)
    ours.freeze_bn()  # the default fine-tune folds BN with frozen statistics from step 0
    ao = torch_ao_qat(fp32, x[:2])
    t = measure({"fp32": step_fn(fp32, x, y), "ours": step_fn(ours, x, y), "torch.ao": step_fn(ao, x, y)},
                repeats, inner)
    print(f"{model_id:<11} batch {batch:>3}: FP32 {t['fp32'] * 1e3:7.2f} ms | ours {t['ours'] * 1e3:7.2f} ms "
          f"(x{t['ours'] / t['fp32']:.2f}) | torch.ao {t['torch.ao'] * 1e3:7.2f} ms (x{t['torch.ao'] / t['fp32']:.2f})",
          flush=True)


def torchvision_case(batch: int, repeats: int, inner: int) -> None:
    """torchvision's own resnet18 at 3×224×224: ours from its traced graph; torch.ao on torchvision's
    fusable copy (``torchvision.models.quantization.resnet18``: fuse_model(is_qat=True), prepare_qat)."""
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    tv = library.import_torchvision()
    torch.manual_seed(0)
    fp32 = tv.models.resnet18(num_classes=10)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    ours = prepare(fp32, runner.default_config("digits-cnn").plan.model_copy(update={"overrides": {}}), x[:2])
    train.calibrate(ours, [(x, y)], 1)
    ours.freeze_bn()
    ao = tv.models.quantization.resnet18(num_classes=10)
    ao.load_state_dict(fp32.state_dict(), strict=False)
    ao.eval().fuse_model(is_qat=True)
    ao.qconfig = get_default_qat_qconfig("fbgemm")
    prepare_qat(ao.train(), inplace=True)
    ao(x[:2])
    t = measure({"fp32": step_fn(fp32, x, y), "ours": step_fn(ours, x, y), "torch.ao": step_fn(ao, x, y)},
                repeats, inner)
    print(f"{'tv resnet18':<11} batch {batch:>3}: FP32 {t['fp32'] * 1e3:7.2f} ms | ours {t['ours'] * 1e3:7.2f} ms "
          f"(x{t['ours'] / t['fp32']:.2f}) | torch.ao {t['torch.ao'] * 1e3:7.2f} ms (x{t['torch.ao'] / t['fp32']:.2f})",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {args.threads} threads; median of {r} interleaved rounds")
    case("digits-cnn", 32, r, 20)
    case("digits-cnn", 256, r, 5)
    case("resnet18", 8, max(3, r // 3), 1)
    torchvision_case(8, max(3, r // 3), 1)


if __name__ == "__main__":
    main()
