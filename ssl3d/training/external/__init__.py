"""Pretrained encoders from ssl3d folders and from the tools next door (nnssl, MONAI), behind one interface."""
from ssl3d.training.external.source import (PretrainedSource, adapt_in_channels, for_downstream,
                                            interpolate_pos_embed, known_formats, load_pretrained,
                                            register_format)

__all__ = ["PretrainedSource", "adapt_in_channels", "for_downstream", "interpolate_pos_embed", "known_formats",
           "load_pretrained", "register_format"]
