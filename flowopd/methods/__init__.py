"""The algorithms, one per module: Flow-GRPO and DiffusionNFT (teachers and the mixed baseline, registered by kind
in `reward_trainers`), the router, the merge and SFT cold starts, the OPD objectives and trainer, and the tiny base's
pretraining. Import the module you need: each stage's code dependencies are the modules it imports."""
