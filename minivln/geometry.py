"""Panorama geometry in the Matterport3D simulator's conventions.

* Heading is measured from the +y axis and grows clockwise seen from above (towards +x);
  elevation is measured from the horizontal plane, looking up is positive.  Radians throughout.
* The standard panorama has 36 discretised views: view ``k`` looks at heading ``(k % 12) * 30°`` and
  elevation ``(k // 12 - 1) * 30°`` (views 0-11 look down 30°, 12-23 level, 24-35 up 30°).
* A navigable neighbour "falls in" the view whose direction is nearest to it, measured as
  ``sqrt(dheading² + delevation²)`` with the heading difference wrapped to [-pi, pi] (the
  simulator keeps, per neighbour, the view where this distance is smallest).
"""

from __future__ import annotations

import math

import numpy as np

NUM_VIEWS = 36
HEADINGS_PER_LEVEL = 12
VIEW_STEP = math.radians(30.0)


def view_heading(view: int) -> float:
    return (view % HEADINGS_PER_LEVEL) * VIEW_STEP


def view_elevation(view: int) -> float:
    return (view // HEADINGS_PER_LEVEL - 1) * VIEW_STEP


VIEW_HEADINGS = np.array([view_heading(k) for k in range(NUM_VIEWS)])
VIEW_ELEVATIONS = np.array([view_elevation(k) for k in range(NUM_VIEWS)])


def wrap_angle(a):
    """Wrap to [-pi, pi)."""
    return (np.asarray(a) + math.pi) % (2 * math.pi) - math.pi


def direction(src: np.ndarray, dst: np.ndarray) -> tuple[float, float, float]:
    """(heading, elevation, euclidean distance) of the line from ``src`` to ``dst`` (xyz, z up)."""
    dx, dy, dz = (float(v) for v in np.asarray(dst, dtype=float) - np.asarray(src, dtype=float))
    horiz = math.hypot(dx, dy)
    dist = math.sqrt(horiz * horiz + dz * dz)
    heading = math.atan2(dx, dy) % (2 * math.pi)
    elevation = math.atan2(dz, horiz)
    return heading, elevation, dist


def nearest_view(heading: float, elevation: float) -> int:
    """Index of the discretised view whose direction is nearest to (heading, elevation)."""
    dh = wrap_angle(heading - VIEW_HEADINGS)
    de = elevation - VIEW_ELEVATIONS
    return int(np.argmin(dh * dh + de * de))


def discretised_view(heading: float, elevation: float = 0.0) -> int:
    """The simulator's ``viewIndex`` for a camera at (heading, elevation): nearest 30° steps,
    elevation clamped to the three levels."""
    h = int(round((heading % (2 * math.pi)) / VIEW_STEP)) % HEADINGS_PER_LEVEL
    level = min(2, max(0, int(round(elevation / VIEW_STEP)) + 1))
    return level * HEADINGS_PER_LEVEL + h
