"""hravatar: relightable, animatable Gaussian head avatars."""
__version__ = "0.1.0"
