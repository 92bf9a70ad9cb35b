"""Hydra accepts launcher plugins only from modules under `hydra_plugins`; the logic lives
in pemt.cluster.launcher."""

from pemt.cluster import launcher


class LocalLauncher(launcher.LocalLauncher):
    pass


class SlurmLauncher(launcher.SlurmLauncher):
    pass
