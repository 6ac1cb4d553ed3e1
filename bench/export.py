"""Row 17: CPU embedding throughput of the exported files (TorchScript, ONNX Runtime) against
PyTorch eager, fp32 and bf16.

The default network (efficientnet_lite0, head 512 -> 128; untrained: the speed does not depend
on the weights) exported with ``retrieval.export`` as the export stage does, then four sides,
interleaved, on the same Caltech-101 images already cropped and normalised in memory (the model
alone, no reading), batch 32, inference only:

* eager fp32: the module as the pipeline runs it with ``precision: fp32`` (channels_last,
  inference_mode);
* eager fp32 NCHW: the same module on contiguous NCHW input, the layout the exported files are
  fed (it separates the layout's share of the TorchScript figure from the runtime's);
* eager bf16: the channels_last module under ``runtime.autocast`` (``precision: bf16``, the
  params.yaml default; autocast only where the CPU has native bf16);
* TorchScript: ``torch.jit.load`` of the exported file, fp32, contiguous NCHW input (what a user
  of the file feeds it), inference_mode;
* ONNX Runtime: the exported file in an ``InferenceSession`` on the CPUExecutionProvider with
  as many intra-op threads as torch uses, numpy NCHW input.

Each side's figure is its fastest round, as a ratio to eager fp32 measured in the same run.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import common
import numpy as np
import torch

from retrieval import export, runtime, transforms

CPU = torch.device("cpu")
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5}  # params.yaml export: (the stage's defaults)


def batched(embed, inputs: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(inputs), batch_size):
        embed(inputs[start:start + batch_size])


def eager(net: torch.nn.Module, precision: str):
    def embed(x: torch.Tensor) -> None:
        with torch.inference_mode(), runtime.autocast(CPU, precision):
            net(x)
    return embed


def run(quick: bool, workdir: Path) -> common.Result:
    backbone, size, n, batch, rounds = (("cifar_resnet", 32, 32, 32, 1) if quick else
                                        ("efficientnet_lite0", 160, 256, 32, 5))
    images, _ = common.image_cache(n, size, seed=0, workdir=workdir)
    net = common.embedding_net(backbone).eval()
    inputs = transforms.normalize(transforms.eval_crop(size)(images.batch(np.arange(n))),
                                  net.normalization)  # (N, 3, s, s) float32, contiguous
    folder = workdir / "export"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export.export_onnx(net, size, folder / export.ONNX_FILE, opset=18)
    onnx_seconds = time.perf_counter() - started
    started = time.perf_counter()
    sha256 = export.export_torchscript(net, size, folder / export.TORCHSCRIPT_FILE)
    torchscript_seconds = time.perf_counter() - started
    threads = torch.get_num_threads()
    session = export.onnx_session(folder / export.ONNX_FILE, threads=threads)
    scripted = export.load_torchscript(folder / export.TORCHSCRIPT_FILE, sha256)
    differences = export.max_differences(
        net, {"onnx": folder / export.ONNX_FILE, "torchscript": folder / export.TORCHSCRIPT_FILE},
        inputs[:8], sha256)

    nchw_net = copy.deepcopy(net).eval()  # before prepare_model moves net to channels_last
    pipeline_net = runtime.prepare_model(net, CPU).eval()  # channels_last, as run_batched
    pipeline_inputs = inputs.contiguous(memory_format=torch.channels_last)
    numpy_inputs = inputs.numpy()
    sides = {
        "eager fp32": lambda: batched(eager(pipeline_net, "fp32"), pipeline_inputs, batch),
        "eager fp32 NCHW": lambda: batched(eager(nchw_net, "fp32"), inputs, batch),
        "eager bf16 autocast": lambda: batched(eager(pipeline_net, "bf16"), pipeline_inputs,
                                               batch),
        "TorchScript": lambda: batched(eager(scripted, "fp32"), inputs, batch),
        "ONNX Runtime": lambda: batched(lambda x: export.embed_onnx(session, x), numpy_inputs,
                                        batch),
    }
    times = common.interleaved(sides, rounds, warmup=not quick)
    rates = {name: common.rate(n, values) for name, values in times.items()}
    ratios = {name: rates[name] / rates["eager fp32"] for name in rates}
    within = all(differences[name] <= TOLERANCE[name] for name in differences)
    bf16 = runtime.bf16_supported(CPU)
    table = ", ".join(f"{name} {rates[name]:.1f} images/s ({ratios[name]:.2f}×)"
                      for name in rates)
    return common.Result(
        row=17, name="export",
        what="Embedding throughput of the exported model: TorchScript and ONNX Runtime vs "
             "PyTorch eager (CPU)",
        conditions=(f"{backbone} (head 512 → 128), {size} px, batch {batch}, {n} Caltech-101 "
                    f"images pre-cropped and normalised in memory, {threads} threads (torch and "
                    f"onnxruntime), fp32 unless stated; native bf16: {bf16}"),
        figure=(f"vs eager fp32 channels_last ({rates['eager fp32']:.1f} images/s): ONNX "
                f"Runtime {ratios['ONNX Runtime']:.2f}×, TorchScript {ratios['TorchScript']:.2f}× "
                f"(eager NCHW {ratios['eager fp32 NCHW']:.2f}×), eager bf16 "
                f"{ratios['eager bf16 autocast']:.2f}×; max |difference| ONNX "
                f"{differences['onnx']:.1e}, TorchScript {differences['torchscript']:.1e}"),
        target="exports within 1e-4 (ONNX) / 1e-5 (TorchScript) of eager fp32; speed: a table",
        passed=within,
        details={"images_per_s": rates, "ratio_to_eager_fp32": ratios, "times_s": times,
                 "max_abs_difference": differences, "export_seconds":
                 {"onnx": onnx_seconds, "torchscript": torchscript_seconds},
                 "file_bytes": {name: (folder / file).stat().st_size
                                for name, file in export.FORMATS.items()}},
        notes=[f"Row 17 in images/s: {table}. Export itself took {onnx_seconds:.1f} s (ONNX, "
               f"torch.onnx.export with dynamo=True) and {torchscript_seconds:.1f} s "
               "(TorchScript, torch.jit.trace)."])
