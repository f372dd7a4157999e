"""The DVC pipelines: dvc.yaml written from the spec files (one stage per phase and sub-spec, code dependencies
computed from imports), and experiments (`flowopd exp run`)."""
