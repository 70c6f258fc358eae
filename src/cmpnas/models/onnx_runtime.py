"""ONNX Runtime on the model floor: the one session factory, in-memory export, and latency measured in ORT.

Why here and not in :mod:`cmpnas.serving`: query models are deployed with ONNX Runtime, so the search's
latency table times its blocks in ORT, and the search may not import serving (layer contract). Serving
uses :func:`session` and :func:`export_legacy` from here, so both sides run the same settings.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.models.timing import Timer, check_timing_args, dummy_input, torch_threads

DEFAULT_OPSET = 18


def session(source: str | Path | bytes, threads: int | None = None, optimize: bool = True) -> Any:
    """An ``InferenceSession`` on the CPU provider; ``threads`` pins intra-op threads (inter-op to 1).

    ``source`` is an ``.onnx`` path or the serialised model itself (see :func:`to_onnx_bytes`).
    ``optimize=False`` runs the graph as written: a quantized (QDQ) file's arithmetic is then simulated in
    float, without the fused int8 kernels, so it is the reference those kernels can be checked against.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    model = source if isinstance(source, bytes) else str(source)
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
        if isinstance(source, bytes):
            raise CmpnasError(
                f"The in-memory ONNX model does not load in ONNX Runtime ({str(exc)[:200]}).",
                "export the module with another opset, or time it with runtime='torch'",
            ) from None
        raise CmpnasError(
            f"'{source}' is not a loadable ONNX model ({str(exc)[:200]}).",
            "re-run cmpnas export --model MODEL.safetensors --out FILE.onnx",
        ) from None


def export_legacy(
    module: nn.Module,
    example: torch.Tensor,
    f: str | Path | IO[bytes],
    *,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] = ("x",),
    output_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    """The TorchScript (legacy) exporter with its deprecation warnings silenced: it is deprecated but 1-3 s
    faster per model than dynamo, and gives the same graph on these nets (see cmpnas.serving.export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            f if not isinstance(f, Path) else str(f),
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names) if output_names is not None else None,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
        )


def to_onnx_bytes(module: nn.Module, input_shape: Sequence[int], opset: int = DEFAULT_OPSET) -> bytes:
    """``module`` (in eval mode) as a serialised ONNX model with a fixed ``input_shape``, never touching disk.

    Traced with one torch thread (much faster on a busy machine, same graph); the mode is restored.
    """
    was_training = module.training
    buf = io.BytesIO()
    try:
        module.eval()
        with torch_threads(1), torch.no_grad():
            export_legacy(module, dummy_input(module, input_shape), buf, opset=opset)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CmpnasError(
            f"ONNX export failed on an input of shape {tuple(input_shape)}: {str(exc)[:200]}.",
            "pass the input shape the module was built for, or time it with runtime='torch'",
        ) from None
    finally:
        module.train(was_training)
    return buf.getvalue()


def prepare_onnx(module: nn.Module, input_shape: Sequence[int], threads: int | None = 1) -> Timer:
    """Export ``module`` and open its ORT session; the timer runs ``session.run`` on the seeded input, as
    serving calls it."""
    check_timing_args(0, 1, threads)
    sess = session(to_onnx_bytes(module, input_shape), threads)
    feed = {sess.get_inputs()[0].name: dummy_input(module, input_shape).detach().cpu().numpy()}
    return Timer(lambda: sess.run(None, feed))


def measure_onnx_latency_ms(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = 1,
) -> dict[str, float]:
    """Wall-clock ms of one batch-``input_shape[0]`` run of ``module`` exported to ONNX, in an ORT session.

    Same contract as :func:`cmpnas.models.cost.measure_latency_ms` (``{"p50", "p90", "mean"}``, the same
    seeded input), but timed in the deployment runtime: ORT fuses conv+BN+ReLU and runs small nets ~20x
    faster than torch eager, so torch timings say little about a deployed query model.
    """
    check_timing_args(warmup, repeats, threads)
    return prepare_onnx(module, input_shape, threads).measure(warmup, repeats)


def versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
