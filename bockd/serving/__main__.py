"""Entry point: ``python -m bockd.serving --model_dir DIR [--model_dir DIR2 ...] --model_name NAME``."""

from bockd.serving.server import main

if __name__ == "__main__":
    main()
