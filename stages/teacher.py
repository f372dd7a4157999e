"""Stage `teacher`: run by dvc.yaml as `python stages/teacher.py --spec SPEC --teacher NAME --base DIR --data DIR
--out DIR --curve CSV` (see `--help`)."""

from flowopd.teachers import stage_main

if __name__ == "__main__":
    stage_main("teacher")
