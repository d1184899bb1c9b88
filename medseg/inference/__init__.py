"""Inference: model packages, sliding-window prediction back in the input scan's geometry."""
