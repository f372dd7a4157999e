"""Stage `data`: run by dvc.yaml as `python stages/data.py --spec SPEC --out DIR ...` (see `--help`)."""

from flowopd.phases.data import main

if __name__ == "__main__":
    main()
