"""pemt's entry points as importable modules: the Hydra apps (`pemt-pretrain`, `pemt-finetune`,
`python -m pemt.apps.pretrain`) and the tools (`pemt-resume`, `pemt-export`, ...). The scripts in
the repository's launch/ and tools/ folders call these."""
