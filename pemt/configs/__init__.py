"""pemt's Hydra configs, shipped inside the package (found as pkg://pemt.configs)."""
