"""Keeps the configs' and checkpoints' path `...train_clip_src.open_clip.model.AVCLIP` working."""

from model.avclip import AVCLIP

__all__ = ["AVCLIP"]
