"""The exported student's own answer, from PyTorch in the trainer image, for the serving check to match.

Rebuilds the student from model.safetensors + config.json (``bockd.export.load_student``) and classifies the
first test images of the prepare-data Dataset artifact, normalized as the server does. serve.py then asks the
serving image (ONNX Runtime, no torch) and compares.

Usage: python3 reference.py STUDENT_DIR PREPARE_DATA_JSON OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from bockd.export import load_student, read_student_config
from bockd.serving.preprocess import InputSpec

NUM_IMAGES = 8  # serve.py sends the same ones


def main(argv: list[str]) -> int:
    student_dir, prepared, out = Path(argv[0]), json.loads(Path(argv[1]).read_text()), Path(argv[2])
    with np.load(Path(prepared["artifacts"]["dataset"]["path"]) / "test.npz") as test:
        images = test["x"][:NUM_IMAGES]
    spec = InputSpec.from_config(read_student_config(student_dir))
    x = spec.normalize(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.inference_mode():
        probs = torch.softmax(load_student(student_dir)(torch.from_numpy(x)), dim=1).numpy()
    out.write_text(json.dumps({"probabilities": probs.tolist()}) + "\n")
    print(f"reference: {len(probs)} images classified by {student_dir} with torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
