"""Slice geometry of synthetic series in DICOM patient coordinates (LPS, millimetres).

A series is a stack of parallel planes: plane ``k`` has its first pixel at ``positions[k]``;
moving along a row (increasing column index) goes along ``row_dir`` by ``spacing[1]``; moving
down a column (increasing row index) goes along ``col_dir`` by ``spacing[0]``. This is exactly
what ImagePositionPatient / ImageOrientationPatient / PixelSpacing say, so rendering the
anatomy at ``world_points()`` and writing those tags keeps pixels and geometry consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# CT orientation variants, exercised in turn by the cohort so geometry code meets each one.
#   standard:   head first supine, instance 1 at the top of the chest, row -> L, col -> P
#   reverse:    same planes, instances numbered feet to head
#   feet_first: feet first supine: rows run towards the patient's right (R), col -> P
#   prone:      head first prone: row -> R, col -> A
CT_ORIENTATIONS = ("standard", "reverse", "feet_first", "prone")
_CT_FRAMES = {
    "standard": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), "HFS"),
    "reverse": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), "HFS"),
    "feet_first": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), "FFS"),
    "prone": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), "HFP"),
}


@dataclass
class SliceStack:
    """Geometry of a stack of ``len(positions)`` planes of ``rows x cols`` pixels."""

    rows: int
    cols: int
    spacing: tuple[float, float]  # (between rows, between columns) = DICOM PixelSpacing
    row_dir: np.ndarray  # (3,) unit vector along a row
    col_dir: np.ndarray  # (3,) unit vector down a column
    positions: np.ndarray  # (K, 3) ImagePositionPatient of each plane, in instance order
    slice_spacing: float
    patient_position: str = "HFS"
    variant: str = "oblique"  # one of CT_ORIENTATIONS for CT stacks

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def iop(self) -> list[float]:
        return [round(float(v), 6) for v in (*self.row_dir, *self.col_dir)]

    def world_points(self) -> np.ndarray:
        """(K, rows, cols, 3) LPS coordinates of every pixel centre."""
        r = np.arange(self.rows)[:, None, None] * self.spacing[0] * self.col_dir
        c = np.arange(self.cols)[None, :, None] * self.spacing[1] * self.row_dir
        return self.positions[:, None, None, :] + (r + c)[None]

    def ras_affine(self) -> np.ndarray:
        """NIfTI affine (RAS) of the array ``data[col, row, k]`` (nibabel's i, j, k order).

        Built in the slice order of ``positions``; LPS -> RAS flips the first two axes.
        """
        lps = np.eye(4)
        lps[:3, 0] = self.row_dir * self.spacing[1]
        lps[:3, 1] = self.col_dir * self.spacing[0]
        step = (self.positions[1] - self.positions[0]) if len(self.positions) > 1 else self.normal
        lps[:3, 2] = step
        lps[:3, 3] = self.positions[0]
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def ct_stack(
    matrix: int, n_slices: int, slice_spacing: float, z_top: float, variant: str, fov: float
) -> SliceStack:
    """Axial CT planes covering ``z_top`` downwards, centred on the patient axis."""
    row, col, position = _CT_FRAMES[variant]
    row_dir, col_dir = np.array(row), np.array(col)
    ps = round(fov / matrix, 4)
    half = (matrix - 1) / 2 * ps
    # First pixel sits half a field of view "back" along both in-plane directions.
    corner = -half * row_dir - half * col_dir
    zs = z_top - slice_spacing * np.arange(n_slices)  # head -> feet
    if variant in ("reverse", "feet_first"):
        zs = zs[::-1]
    positions = np.stack([corner + np.array([0.0, 0.0, z]) for z in zs])
    return SliceStack(
        rows=matrix,
        cols=matrix,
        spacing=(ps, ps),
        row_dir=row_dir,
        col_dir=col_dir,
        positions=np.round(positions, 4),
        slice_spacing=slice_spacing,
        patient_position=position,
        variant=variant,
    )


def draw_ct_stack(rng: np.random.Generator, matrix: int, variant: str) -> SliceStack:
    """A chest CT acquisition as the cohort draws one: 42-62 % of ``matrix`` slices over
    240-300 mm (slice spacing rounded to 0.5 mm, at least 1 mm), from 155-165 mm down, over a
    350 mm field of view."""
    n = max(8, round(matrix * rng.uniform(0.42, 0.62)))
    spacing = max(1.0, round(rng.uniform(240, 300) / n * 2) / 2)
    return ct_stack(matrix, n, spacing, float(155 + rng.uniform(0, 10)), variant, 350.0)


def oblique_stack(
    matrix: int,
    n_slices: int,
    slice_spacing: float,
    centre: np.ndarray,
    normal: np.ndarray,
    fov: float,
) -> SliceStack:
    """Oblique planes (cardiac short axis) centred on ``centre`` stacked along ``normal``."""
    n = normal / np.linalg.norm(normal)
    row = np.cross(n, [0.0, 0.0, 1.0])
    row /= np.linalg.norm(row)
    col = np.cross(n, row)  # row x col == n
    ps = round(fov / matrix, 4)
    half = (matrix - 1) / 2 * ps
    offsets = (np.arange(n_slices) - (n_slices - 1) / 2) * slice_spacing
    positions = np.stack([centre + o * n - half * row - half * col for o in offsets])
    return SliceStack(
        rows=matrix,
        cols=matrix,
        spacing=(ps, ps),
        row_dir=np.round(row, 6),
        col_dir=np.round(col, 6),
        positions=np.round(positions, 4),
        slice_spacing=slice_spacing,
    )


def projection_grid(rows: int, cols: int, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Frontal radiograph grid: rows run head -> feet (z down), columns R -> L (x up).

    Returns x (cols,) and z (rows,) coordinates in LPS mm; the beam runs along y.
    """
    x = (np.arange(cols) - (cols - 1) / 2) * pixel
    z = 40.0 - (np.arange(rows) - (rows - 1) / 2) * pixel  # centre the chest, apex near the top
    return x, z
