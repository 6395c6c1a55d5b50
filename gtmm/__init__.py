"""Plumbing shared by every command of the toolkit: the CLI entry wrapper (`gtmm.cli`) and safe file writes and
folder locks (`gtmm.fs`). The science lives in `envs/`, `agents/`, `rollouts/` and `worldmodel/`."""
