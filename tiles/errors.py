"""The one exception type for imagery the package cannot use."""

from __future__ import annotations


class ImageryError(ValueError):
    """Bad imagery input: not a raster, empty or truncated file, a bbox outside the source or of
    zero area, an absurd size, an unsupported dtype or band count, an unknown CRS.

    The message is written for the person who chose the input, not for a developer: it says what
    is wrong and, where there is one, what to do instead.
    """
