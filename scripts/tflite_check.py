"""Check a run's model.tflite against its SavedModel on held-out data, in a process of its own.

  python scripts/tflite_check.py --run_dir=runs/keyboard-... [--examples=500] [--tflite=other.tflite]

Loads the SavedModel's ``serving_default`` and runs ``tf.lite.Interpreter`` on the same held-out on-device calls
of the run's task (rebuilt from its config.json). Prints one JSON object: the calls compared, the largest output
difference and, for the keyboard, the share of calls whose top-1 and top-3 suggestions agree and each model's top-1
accuracy on the next word (held-out data: operator-only).
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

flags.DEFINE_string("run_dir", None, "A finished run directory (with saved_model/ and model.tflite).")
flags.DEFINE_string("tflite", None, "The .tflite file to check (default: <run_dir>/model.tflite).")
flags.DEFINE_integer("examples", 500, "Held-out on-device calls to compare.")
FLAGS = flags.FLAGS


def main(argv):
    cli.check_no_extra_args(argv)
    import json

    import tensorflow as tf

    import tasks
    from tff_pipeline import config, tflite

    run_dir = FLAGS.run_dir
    if not run_dir or not os.path.exists(os.path.join(run_dir, "config.json")):
        raise cli.UserError(f"--run_dir={run_dir!r} is not a run directory (no config.json); give a finished run")
    path = FLAGS.tflite or os.path.join(run_dir, "model.tflite")
    if not os.path.exists(path):
        raise cli.UserError(f"{path} does not exist: the run exported no TensorFlow Lite model (--tflite=none, or "
                            f"its task's ops have no TFLite kernels); give --tflite=PATH")
    cfg = config.from_json(os.path.join(run_dir, "config.json"))
    task = tasks.build(cfg)
    if task.device_examples is None:
        raise cli.UserError(f"task {task.name!r} has no held-out on-device examples to compare on")
    examples, labels = task.device_examples(FLAGS.examples)
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    served = tf.saved_model.load(os.path.join(run_dir, "saved_model")).signatures["serving_default"]
    lite_out = [runner(**ex) for ex in examples]
    ref_out = [{k: v.numpy() for k, v in served(**{k: tf.constant(v) for k, v in ex.items()}).items()}
               for ex in examples]
    res = tflite.agreement(lite_out, ref_out, labels)
    print(json.dumps({"tflite": path, "bytes": os.path.getsize(path), **res}))
    return 0


if __name__ == "__main__":
    cli.main(main)
