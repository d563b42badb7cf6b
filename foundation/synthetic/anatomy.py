"""A simple chest phantom whose biomarkers are known: heart size, coronary calcium, nodules.

All shapes live in DICOM patient coordinates (LPS, mm): x towards the patient's left, y
towards the back, z towards the head. The body is an elliptic cylinder; lungs, heart,
nodules and calcifications are ellipsoids or spheres, so the same phantom can be sampled
on any plane (CT slices, oblique MR) or integrated along the beam (radiograph).

Labels planted from the phantom:
- cardiothoracic ratio = heart width / inner thoracic width = ``heart_semi[0] / thorax_half``
  (the lungs' outer edges are exactly at +-``thorax_half``);
- calcium score (Agatston-like) = sum over lesions of area (mm2) x density weight x number of
  3 mm slices the lesion spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

# Tissue labels and their value per modality.
AIR, FAT, SOFT, LUNG, MYOCARDIUM, BLOOD, BONE, NODULE, CALCIUM = range(9)
CT_HU = np.array([-1000, -100, 40, -850, 45, 38, 650, 30, 0], dtype=np.float32)
MR_SIGNAL = np.array([0.0, 0.9, 0.35, 0.06, 0.3, 0.85, 0.45, 0.4, 0.1], dtype=np.float32)
CALCIUM_MIN_HU = 130.0  # Agatston threshold


@dataclass(frozen=True)
class Lesion:
    """A sphere of a given peak density (calcification or nodule)."""

    centre: tuple[float, float, float]
    radius: float  # mm
    hu: float


@dataclass(frozen=True)
class Anatomy:
    """The phantom as it is at one study."""

    body_semi: tuple[float, float]  # (x, y) semi-axes of the body outline, mm
    fat: float  # subcutaneous fat thickness, mm
    thorax_half: float  # inner thoracic half-width (lungs' outer edge), mm
    lung_semi_yz: tuple[float, float]
    lung_z: float
    heart_centre: tuple[float, float, float]
    heart_semi: tuple[float, float, float]
    spine_y: float
    spine_radius: float
    nodules: tuple[Lesion, ...] = ()
    calcifications: tuple[Lesion, ...] = ()

    @property
    def ctr(self) -> float:
        return self.heart_semi[0] / self.thorax_half

    @property
    def lung_centres(self) -> tuple[tuple[float, float, float], ...]:
        """(right, left) lung centres; each lung spans ``lung_semi_x`` around its centre."""
        cx = self.thorax_half / 2 + 3.0
        return ((-cx, 0.0, self.lung_z), (cx, 0.0, self.lung_z))

    @property
    def lung_semi_x(self) -> float:
        return self.thorax_half / 2 - 3.0


@dataclass
class PatientAnatomy:
    """A patient's phantom and how it changes between the first and last study."""

    base: Anatomy
    ctr_growth: float  # added to the CTR at the last study
    calcifications: list[Lesion] = field(default_factory=list)  # in order of appearance
    first_fraction: float = 1.0  # fraction of calcifications already present at the first study

    def at(self, stage: float) -> Anatomy:
        """The phantom at ``stage`` in [0, 1] (0: first study, 1: last)."""
        b = self.base
        ctr = b.ctr + self.ctr_growth * stage
        ax = ctr * b.thorax_half
        scale = ax / b.heart_semi[0]
        semi = (ax, b.heart_semi[1] * scale, b.heart_semi[2] * scale)
        frac = self.first_fraction + (1 - self.first_fraction) * stage
        n = round(len(self.calcifications) * frac)
        # Calcifications sit on the heart wall: move them with the heart as it grows.
        hc = np.array(b.heart_centre)
        calcs = tuple(
            replace(c, centre=tuple(hc + (np.array(c.centre) - hc) * scale))
            for c in self.calcifications[:n]
        )
        return replace(b, heart_semi=semi, calcifications=calcs)


def sample_patient(rng: np.random.Generator) -> PatientAnatomy:
    """Draw a phantom: CTR 0.38-0.62, 0-16 calcifications, nodules for about a third."""
    a, b = float(rng.uniform(145, 175)), float(rng.uniform(100, 125))
    fat = float(rng.uniform(8, 25))
    inner_a, inner_b = a - fat, b - fat
    t = 0.88 * inner_a
    ctr = float(rng.uniform(0.38, 0.60))
    ax = ctr * t
    ay = min(0.75 * ax, 0.55 * inner_b)
    az = float(np.clip(0.8 * ax, 45, 75))
    heart_c = (0.3 * ax, -0.25 * inner_b, -30.0)  # about two thirds left of the midline
    base = Anatomy(
        body_semi=(a, b),
        fat=fat,
        thorax_half=t,
        lung_semi_yz=(0.8 * inner_b, 140.0),
        lung_z=10.0,
        heart_centre=heart_c,
        heart_semi=(ax, ay, az),
        spine_y=0.62 * inner_b,
        spine_radius=float(rng.uniform(14, 18)),
    )
    nodules = _sample_nodules(rng, base) if rng.random() < 0.35 else ()
    base = replace(base, nodules=nodules)
    n_calc = 0 if rng.random() < 0.35 else int(min(16, 1 + rng.geometric(0.2)))
    calcs = [_sample_calcification(rng, base) for _ in range(n_calc)]
    return PatientAnatomy(
        base=base,
        ctr_growth=float(rng.uniform(0.0, 0.02)),
        calcifications=calcs,
        first_fraction=float(rng.uniform(0.5, 1.0)),
    )


def _sample_calcification(rng: np.random.Generator, a: Anatomy) -> Lesion:
    # Coronary-like: on the heart wall, towards the base (superior) and the front.
    u = rng.normal(size=3) + np.array([0.0, -0.6, 0.7])
    u /= np.linalg.norm(u)
    centre = np.array(a.heart_centre) + 0.9 * u * np.array(a.heart_semi)
    radius = float(np.clip(rng.lognormal(np.log(2.0), 0.4), 1.0, 5.0))
    hu = float(rng.choice([rng.uniform(150, 400), rng.uniform(400, 1000)]))
    return Lesion(tuple(float(v) for v in centre), radius, hu)


def _sample_nodules(rng: np.random.Generator, a: Anatomy) -> tuple[Lesion, ...]:
    out = []
    for _ in range(int(rng.integers(1, 3))):
        for _try in range(50):
            side = a.lung_centres[int(rng.integers(2))]
            u = rng.uniform(-0.6, 0.6, size=3)
            p = np.array(side) + u * np.array([a.lung_semi_x, *a.lung_semi_yz])
            d = (p - np.array(a.heart_centre)) / np.array(a.heart_semi)
            if (d**2).sum() > 1.6:  # keep clear of the heart
                break
        out.append(Lesion(tuple(float(v) for v in p), float(rng.uniform(2.5, 11.0)), 30.0))
    return tuple(out)


def nodule_lobe(a: Anatomy, n: Lesion) -> str:
    """Lobe of a nodule, French abbreviation: LSD, LM, LID, LSG, LIG."""
    x, y, z = n.centre
    rel = z - a.lung_z
    if x < 0:  # patient's right
        if rel > 40:
            return "LSD"
        return "LM" if rel > -10 and y < 0 else "LID"
    return "LSG" if rel > 10 else "LIG"


def agatston_weight(hu: float) -> int:
    return 1 if hu < 200 else 2 if hu < 300 else 3 if hu < 400 else 4


def calcium_score(a: Anatomy) -> float:
    """Agatston-like score: area x density weight x number of 3 mm slices per lesion."""
    total = 0.0
    for c in a.calcifications:
        slices = max(1, round(2 * c.radius / 3.0))
        total += np.pi * c.radius**2 * agatston_weight(c.hu) * slices
    return round(float(total), 1)


def _ellipsoid(xyz: tuple[np.ndarray, ...], centre, semi) -> np.ndarray:
    """Flat indices of the points inside an axis-aligned ellipsoid (z band tested first)."""
    x, y, z = xyz
    (cx, cy, cz), (sx, sy, sz) = centre, semi
    cand = np.flatnonzero(np.abs(z - cz) <= sz)  # cheap pre-filter: most points fail here
    d = ((x[cand] - cx) / sx) ** 2 + ((y[cand] - cy) / sy) ** 2 + ((z[cand] - cz) / sz) ** 2
    return cand[d <= 1.0]


def tissue_labels(
    a: Anatomy, p: np.ndarray, min_radius: float = 0.0, calcium: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue label (uint8) and calcification HU (float32) at points ``p`` (..., 3) in LPS mm.

    ``min_radius`` is about half a voxel diagonal: a lesion smaller than that is drawn at that
    radius with its density diluted by the area ratio (partial volume), so every planted
    calcification leaves a trace above 130 HU whatever the grid.
    """
    shape = p.shape[:-1]
    xyz = tuple(np.ascontiguousarray(p[..., i], dtype=np.float32).ravel() for i in range(3))
    x, y, z = xyz
    (ba, bb), f = a.body_semi, a.fat
    lab = np.zeros(x.shape, dtype=np.uint8)
    # Above the lung apices the body narrows to the neck (over 30 mm, to 40 % of its width).
    neck_z = a.lung_z + a.lung_semi_yz[1] - 5.0
    s = np.clip(1.0 - (z - neck_z) / 30.0 * 0.6, 0.4, 1.0)
    lab[(x / (ba * s)) ** 2 + (y / (bb * s)) ** 2 <= 1] = FAT
    inner = (x / ((ba - f) * s)) ** 2 + (y / ((bb - f) * s)) ** 2
    lab[inner <= 1] = SOFT
    ribs = (inner > 0.82) & (inner <= 0.9) & (np.mod(z + 200.0, 32.0) < 11.0) & (z < neck_z)
    lab[ribs] = BONE
    for centre in a.lung_centres:
        lab[_ellipsoid(xyz, centre, (a.lung_semi_x, *a.lung_semi_yz))] = LUNG
    lab[_ellipsoid(xyz, a.heart_centre, a.heart_semi)] = MYOCARDIUM
    lab[_ellipsoid(xyz, a.heart_centre, tuple(0.7 * s for s in a.heart_semi))] = BLOOD
    lab[(x**2 + (y - a.spine_y) ** 2 <= a.spine_radius**2) & (lab != AIR)] = BONE
    for n in a.nodules:
        lab[_ellipsoid(xyz, n.centre, (n.radius,) * 3)] = NODULE
    hu = np.zeros(lab.shape, dtype=np.float32)
    if calcium:
        for c in a.calcifications:
            r = max(c.radius, min_radius)
            # Dilute by the area ratio (Agatston weighs area); render_ct keeps it above 130.
            value = CALCIUM_MIN_HU + max(1.0, (c.hu - CALCIUM_MIN_HU) * (c.radius / r) ** 2)
            idx = _ellipsoid(xyz, c.centre, (r, r, r))
            lab[idx] = CALCIUM
            hu[idx] = np.maximum(hu[idx], value)
    return lab.reshape(shape), hu.reshape(shape)


def render_ct(a: Anatomy, points: np.ndarray, voxel: tuple[float, ...], rng) -> np.ndarray:
    """HU (int16) at ``points`` (..., 3) with mild Gaussian noise (sigma 12 HU)."""
    min_r = 0.5 * float(np.sqrt(np.sum(np.square(voxel))))
    lab, calc = tissue_labels(a, points, min_radius=min_r)
    hu = np.where(lab == CALCIUM, calc, CT_HU[lab])
    hu = hu + rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
    # Noise must not hide a planted calcification: its voxels stay above the 130 HU threshold.
    hu = np.where(lab == CALCIUM, np.maximum(hu, CALCIUM_MIN_HU + 1), hu)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def render_mr(a: Anatomy, points: np.ndarray, rng) -> np.ndarray:
    """Bright-blood-like MR signal (uint16, 0-~2500) with a smooth coil bias and noise."""
    lab, _ = tissue_labels(a, points, calcium=False)
    sig = MR_SIGNAL[lab]
    centre = np.array(a.heart_centre, dtype=np.float32)
    bias = 1.0 - 0.25 * np.linalg.norm(points - centre, axis=-1) / 250.0
    sig = sig * bias + np.abs(rng.normal(0.0, 0.02, size=sig.shape))
    return np.clip(sig * 2500, 0, 4095).astype(np.uint16)


def render_projection(a: Anatomy, x: np.ndarray, z: np.ndarray, depth: int = 32) -> np.ndarray:
    """Frontal radiograph (rows = z, cols = x), values in [0, 1]: the scaled line integral.

    Attenuation per mm is proportional to HU + 1000 (water 0.02 /mm); the beam runs along y.
    """
    bb = a.body_semi[1] + 5.0
    y = np.linspace(-bb, bb, depth, dtype=np.float32)
    pts = np.stack(np.broadcast_arrays(x[None, :, None], y[None, None, :], z[:, None, None]), -1)
    lab, _ = tissue_labels(a, pts, calcium=False)
    mu = 0.02 * (1000.0 + CT_HU[lab]) / 1000.0
    mu[lab == BONE] *= 1.6  # photoelectric boost: bone stands out more on a radiograph
    line = mu.sum(-1) * (y[1] - y[0])  # (rows, cols)
    # A processed radiograph is about log(I0 / I), i.e. the line integral itself.
    return np.clip(line / 6.0, 0.0, 1.0)
