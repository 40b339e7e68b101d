"""TensorFlow Lite export: ``model.tflite`` beside the SavedModel, for phones and other small devices.

The task's serving module (the one its SavedModel saves) is converted from its ``serve_on_device`` function when it
has one (the keyboard's fixed [1, seq_len] call) or else from ``serve``. ``float16`` stores float16 weights;
``int8`` is dynamic-range quantisation (int8 weights, float activations). A module whose ops TensorFlow Lite's
builtin kernels lack is not exported: ``convert`` raises ``Unsupported`` naming the ops.

``check`` runs the .tflite file with ``tf.lite.Interpreter`` against the module's own TensorFlow function on the same
inputs: the agreement of their outputs (for a next-word model, the top-1 and top-3 suggestions), the accuracy of
each on the labels where given, and the median time of one call on this CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np

QUANTIZATIONS = ("float16", "int8")


class Unsupported(Exception):
    """The module has ops that TensorFlow Lite's builtin kernels do not cover."""


def device_function(module):
    """The tf.function a device calls: ``serve_on_device`` if the module has one, else ``serve``."""
    return getattr(module, "serve_on_device", None) or module.serve


def convert(module, quantization: str) -> bytes:
    """The flatbuffer of ``device_function(module)``, weights stored as ``quantization`` (float16 or int8)."""
    import tensorflow as tf

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: one of {QUANTIZATIONS}")
    fn = device_function(module).get_concrete_function()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        conv.target_spec.supported_types = [tf.float16]
    try:
        with _native_stderr_to_file():  # the converter's MLIR diagnostics: one line of ours instead
            return conv.convert()
    except Exception as e:  # the converter's ConverterError lists the ops it could not lower
        raise Unsupported(_blocking_ops(str(e))) from e


@contextlib.contextmanager
def _native_stderr_to_file():
    """File descriptor 2 (where TensorFlow's C++ code writes) goes to a temporary file for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _blocking_ops(message: str) -> str:
    ops = sorted(set(re.findall(r"'(tf\.[A-Za-z0-9_]+)'", message)) | set(re.findall(r"\b(tf\.[A-Z][A-Za-z0-9_]+)", message)))
    if ops:
        return f"no TensorFlow Lite builtin kernel for {', '.join(ops)}"
    first = next((line.strip() for line in message.splitlines() if "error" in line.lower()), message.strip()[:200])
    return first


def default_inputs(interpreter) -> dict[str, np.ndarray]:
    """One neutral call of the signature (zeros, empty strings) when a task gives no held-out examples."""
    runner = interpreter.get_signature_runner()
    out = {}
    for name, d in runner.get_input_details().items():
        shape = [max(int(s), 1) for s in d["shape_signature"]]
        out[name] = (np.full(shape, b"", dtype=object) if d["dtype"] == np.bytes_ or d["dtype"] == np.object_
                     else np.zeros(shape, d["dtype"]))
    return out


def check(tflite_model: bytes, module, examples: Optional[list[dict]] = None, labels: Optional[np.ndarray] = None,
          latency_calls: int = 50) -> dict[str, Any]:
    """Runs ``tflite_model`` in ``tf.lite.Interpreter`` and ``device_function(module)`` in TensorFlow on
    ``examples`` (default: one neutral input): the size, the median seconds of one call on this CPU, and
    ``agreement`` of their outputs."""
    import tensorflow as tf

    from tff_pipeline import progress

    interp = tf.lite.Interpreter(model_content=tflite_model)
    runner = interp.get_signature_runner()
    fn = device_function(module).get_concrete_function()
    args = fn.structured_input_signature[0]  # TensorSpecs named as the signature's inputs
    examples = examples or [default_inputs(interp)]
    lite_out, tf_out = [], []
    for i, ex in enumerate(examples):
        progress.report(i + 1, len(examples), "held-out calls")
        lite_out.append(runner(**ex))
        tf_out.append({k: v.numpy() for k, v in fn(*[tf.constant(ex[a.name]) for a in args]).items()})
    times = []
    for _ in range(latency_calls):
        t = time.perf_counter()
        runner(**examples[0])
        times.append(time.perf_counter() - t)
    return {"bytes": len(tflite_model), "seconds_per_call_median": float(np.median(times)),
            **agreement(lite_out, tf_out, labels)}


def agreement(lite_out: list[dict], ref_out: list[dict], labels: Optional[np.ndarray] = None) -> dict[str, Any]:
    """How far the TensorFlow Lite outputs are from the reference's, call by call: the largest absolute difference
    of each float output and, for ``next_word_probabilities``, the share of calls whose top-1 and top-3
    suggestions (as sets) agree, and each one's top-1 accuracy on ``labels``."""
    res: dict[str, Any] = {"calls_compared": len(ref_out), "max_abs_difference": {
        k: float(max(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))
                     for a, b in zip(lite_out, ref_out)))
        for k in ref_out[0] if np.asarray(ref_out[0][k]).dtype.kind == "f"}}
    key = "next_word_probabilities"
    if key in ref_out[0]:
        lp = np.concatenate([np.asarray(o[key]) for o in lite_out])
        rp = np.concatenate([np.asarray(o[key]) for o in ref_out])
        l3, r3 = np.argsort(-lp, 1)[:, :3], np.argsort(-rp, 1)[:, :3]
        res["top1_agreement"] = float(np.mean(l3[:, 0] == r3[:, 0]))
        res["top3_agreement"] = float(np.mean([set(a) == set(b) for a, b in zip(l3, r3)]))
        if labels is not None:
            res["top1_accuracy_tflite"] = float(np.mean(l3[:, 0] == labels))
            res["top1_accuracy_reference"] = float(np.mean(r3[:, 0] == labels))
    return res
