"""Stage `base`: run by dvc.yaml as `python stages/base.py --spec SPEC --out DIR ...` (see `--help`)."""

from flowopd.runtime.launch import pause_gc

if __name__ == "__main__":
    pause_gc()  # until torch and the model library have imported (see pause_gc)
    from flowopd.phases.base import main

    main()
