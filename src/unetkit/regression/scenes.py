"""Procedural 3-D scenes with known depth: a tiny numpy ray caster for built-in demo data.

A pinhole camera at height h above a checkered ground plane, pitched down, looks at spheres
and boxes standing on the ground, and (in most scenes) a back wall. Each pixel's ray is
intersected with every surface; the nearest hit gives the depth (z-buffer: the distance along
the optical axis, what depth sensors and depth data sets store) and the surface normal.
Shading is Lambertian under one directional light with an ambient term and hard shadows cast
by the objects, on textured albedo, plus sensor noise. Depth cues are the real ones: ground
texture gradient, perspective size, occlusion, shading and shadows.

Depth is NaN where nothing is measured: the sky, and surfaces beyond the sensor range
``MAX_RANGE`` (10 m) — the "no return" pixels of real depth sensors, which the regression
losses mask out.

Coordinates: world x right, y **down**, z forward (horizontal); the camera sits at the origin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unetkit.errors import ConfigError

__all__ = [
    "MAX_RANGE",
    "Box",
    "Scene",
    "Sphere",
    "luminance",
    "random_scene",
    "render_scene",
    "synth_depth",
]

MAX_RANGE = 10.0  # metres: beyond it a pixel has no depth (sensor range)
SKY, GROUND, WALL = 0, 1, 2  # surface ids; objects are 3, 4, ...
_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    colour: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Box:
    centre: tuple[float, float, float]
    half: tuple[float, float, float]  # half sizes along the box's own x, y, z
    yaw: float  # rotation about the vertical (y) axis, radians
    colour: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Scene:
    """Camera, light and surfaces of one scene (all lengths in metres, angles in radians).

    The wall is the plane ``wall_normal · P = wall_offset`` (None: open sky).
    """

    shape: tuple[int, int]
    focal: float  # pixels
    pitch: float  # downward tilt of the optical axis
    height: float  # camera height above the ground
    light: tuple[float, float, float]  # unit vector towards the light
    ambient: float
    ground_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    checker: float  # ground checker square size
    wall_normal: tuple[float, float, float] | None
    wall_offset: float
    wall_colour: tuple[float, float, float]
    spheres: tuple[Sphere, ...]
    boxes: tuple[Box, ...]

    def camera_axes(self) -> np.ndarray:
        """3×3 matrix whose columns are the camera's x, y, z axes in world coordinates."""
        c, s = math.cos(self.pitch), math.sin(self.pitch)
        return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])

    def rays(self) -> np.ndarray:
        """H×W×3 world directions with unit *camera-z* component: P = depth · ray."""
        h, w = self.shape
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        d = np.stack(
            [(u + 0.5 - w / 2) / self.focal, (v + 0.5 - h / 2) / self.focal, np.ones((h, w))],
            axis=-1,
        )
        return d @ self.camera_axes().T


def _rand_colour(rng: np.random.Generator, lo: float = 0.2, hi: float = 0.95) -> tuple:
    return tuple(float(c) for c in rng.uniform(lo, hi, size=3))


def random_scene(shape: Sequence[int], rng: np.random.Generator) -> Scene:
    """Draw a random scene: camera, light, ground, optional wall and 3–8 objects."""
    h, w = (int(s) for s in shape)
    fov = rng.uniform(math.radians(50), math.radians(70))
    focal = w / (2 * math.tan(fov / 2))
    height = rng.uniform(1.2, 1.8)
    azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(0.35, 1.2)
    light = (
        math.cos(elevation) * math.cos(azimuth),
        -math.sin(elevation),  # y is down: the light is above
        math.cos(elevation) * math.sin(azimuth),
    )
    has_wall = rng.random() < 0.7
    yaw = rng.uniform(-0.35, 0.35)
    wall_normal = (math.sin(yaw), 0.0, -math.cos(yaw))  # faces the camera
    wall_offset = -rng.uniform(6.0, 9.5)  # n · P = offset: z ≈ -offset straight ahead
    objects: list[Sphere | Box] = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(3, 9))):
        for _attempt in range(10):
            z = rng.uniform(2.2, 7.0)
            x = rng.uniform(-0.85, 0.85) * z * (w / 2) / focal
            size = rng.uniform(0.2, 0.7)
            if all((x - px) ** 2 + (z - pz) ** 2 > (size + pr) ** 2 for px, pz, pr in placed):
                break
        placed.append((x, z, size))
        if rng.random() < 0.5:
            objects.append(Sphere((x, height - size, z), size, _rand_colour(rng)))
        else:
            half = (size * rng.uniform(0.6, 1.0), size * rng.uniform(0.5, 1.4), size * 0.8)
            centre = (x, height - half[1], z)
            objects.append(Box(centre, half, rng.uniform(0, math.pi / 2), _rand_colour(rng)))
    return Scene(
        shape=(h, w),
        focal=focal,
        pitch=rng.uniform(math.radians(4), math.radians(20)),
        height=height,
        light=light,
        ambient=rng.uniform(0.2, 0.4),
        ground_colours=(_rand_colour(rng, 0.3, 0.9), _rand_colour(rng, 0.1, 0.6)),
        checker=rng.uniform(0.4, 1.0),
        wall_normal=wall_normal if has_wall else None,
        wall_offset=wall_offset,
        wall_colour=_rand_colour(rng, 0.3, 0.9),
        spheres=tuple(o for o in objects if isinstance(o, Sphere)),
        boxes=tuple(o for o in objects if isinstance(o, Box)),
    )


def _hit_plane(o: np.ndarray, d: np.ndarray, n: np.ndarray, offset: float) -> np.ndarray:
    """Ray parameter t of the hit with the plane n · P = offset (inf: none ahead)."""
    denom = d @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset - o @ n) / denom
    return np.where((denom != 0) & (t > _EPS), t, np.inf)


def _hit_sphere(o: np.ndarray, d: np.ndarray, s: Sphere) -> np.ndarray:
    oc = o - np.asarray(s.centre)
    a = np.einsum("...i,...i", d, d)
    b = np.einsum("...i,...i", oc, d)
    c = np.einsum("...i,...i", oc, oc) - s.radius**2
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    near, far = (-b - root) / a, (-b + root) / a
    t = np.where(near > _EPS, near, far)
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])  # box frame → world


def _hit_box(o: np.ndarray, d: np.ndarray, b: Box) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in the box's frame: (t, world normal of the face hit).

    Only rays that hit the box's bounding sphere are tested: most rays miss a small box, and
    the sphere test is a few dot products.
    """
    shape = np.broadcast_shapes(o.shape, d.shape)
    t = np.full(shape[:-1], np.inf)
    normal = np.zeros(shape)
    bound = Sphere(b.centre, float(np.linalg.norm(b.half)), (0.0, 0.0, 0.0))
    near = np.isfinite(_hit_sphere(o, d, bound))
    if not near.any():
        return t, normal
    rot = _yaw_matrix(b.yaw)  # world → box frame is @ rot (rot is orthogonal)
    lo = (np.broadcast_to(o, shape)[near] - np.asarray(b.centre)) @ rot
    ld = np.broadcast_to(d, shape)[near] @ rot
    half = np.asarray(b.half)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - lo) / ld, (half - lo) / ld
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    t_in = np.maximum(np.maximum(tmin[:, 0], tmin[:, 1]), tmin[:, 2])
    t_out = np.minimum(np.minimum(tmax[:, 0], tmax[:, 1]), tmax[:, 2])
    t_hit = np.where(t_in > _EPS, t_in, t_out)
    t[near] = np.where((t_out >= t_in) & (t_hit > _EPS), t_hit, np.inf)
    axis = np.argmax(tmin, axis=-1)  # the slab entered last is the face hit
    face = np.zeros(ld.shape)
    face[np.arange(len(axis)), axis] = -np.sign(ld[np.arange(len(axis)), axis])
    normal[near] = face @ rot.T
    return t, normal


def _occluded(scene: Scene, points: np.ndarray) -> np.ndarray:
    """True where the ray from ``points`` towards the light hits an object."""
    light = np.asarray(scene.light)
    blocked = np.zeros(points.shape[:-1], bool)
    for s in scene.spheres:
        blocked |= np.isfinite(_hit_sphere(points, light, s))
    for b in scene.boxes:
        blocked |= np.isfinite(_hit_box(points, light, b)[0])
    return blocked


def render_scene(
    scene: Scene, rng: np.random.Generator | None = None, *, noise: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast ``scene``.

    Args:
        scene: the scene.
        rng: generator for texture and sensor noise (None: no texture noise, no noise).
        noise: standard deviation of the additive Gaussian sensor noise.

    Returns:
        (image, depth, ids): float32 H×W×3 RGB in [0, 1]; float32 H×W z-depth in metres,
        NaN where nothing is measured (sky, beyond ``MAX_RANGE``); int32 H×W surface ids
        (0 sky, 1 ground, 2 wall, 3 + k the k-th object, spheres first, then boxes).
    """
    d = scene.rays()
    origin = np.zeros(3)
    up = np.array([0.0, -1.0, 0.0])
    ts = [np.full(d.shape[:2], np.inf), _hit_plane(origin, d, -up, scene.height)]
    normals: list[np.ndarray | None] = [None, up]  # constant normals, or per pixel
    wall = np.asarray(scene.wall_normal or (0.0, 0.0, -1.0))
    ts.append(
        _hit_plane(origin, d, wall, scene.wall_offset)
        if scene.wall_normal is not None
        else np.full(d.shape[:2], np.inf)
    )
    normals.append(wall)
    ts += [_hit_sphere(origin, d, s) for s in scene.spheres]
    normals += [None] * len(scene.spheres)  # from the hit point, below
    for b in scene.boxes:
        t, nb = _hit_box(origin, d, b)
        ts.append(t)
        normals.append(nb)
    t = np.full(d.shape[:2], np.inf)  # z-buffer: keep the nearest hit per pixel
    ids = np.full(d.shape[:2], SKY, np.int32)
    for k, tk in enumerate(ts):
        nearer = tk < t
        t = np.where(nearer, tk, t)
        ids[nearer] = k
    solid = ids != SKY
    t = np.where(solid, t, 0.0)
    normal = np.zeros(d.shape)
    for k, n in enumerate(normals):
        m = ids == k
        if k == SKY or not m.any():
            continue
        if n is None:  # a sphere: the normal points from its centre to the hit point
            sphere = scene.spheres[k - 3]
            n = (t[m, None] * d[m] - np.asarray(sphere.centre)) / sphere.radius
        elif n.ndim == 3:
            n = n[m]
        normal[m] = n
    points = t[..., None] * d
    albedo = _albedo(scene, ids, points, t, rng)
    lit = np.clip(normal @ np.asarray(scene.light), 0.0, None)
    facing = lit > 0  # only surfaces facing the light can be in a cast shadow
    lit[facing] *= ~_occluded(scene, points[facing] + normal[facing] * 1e-3)
    image = albedo * (scene.ambient + (1 - scene.ambient) * lit)[..., None]
    sky = np.array([0.55, 0.7, 0.95]) * (0.8 + 0.2 * np.linspace(0, 1, d.shape[0]))[:, None, None]
    image = np.where(solid[..., None], image, sky)
    if rng is not None and noise > 0:
        image = image + rng.normal(0.0, noise, size=image.shape)
    depth = np.where(solid & (t <= MAX_RANGE), t, np.nan)  # t = camera-z depth (ray z_cam = 1)
    return (
        np.clip(image, 0.0, 1.0).astype(np.float32),
        depth.astype(np.float32),
        ids,
    )


def _albedo(
    scene: Scene,
    ids: np.ndarray,
    points: np.ndarray,
    t: np.ndarray,
    rng: np.random.Generator | None,
) -> np.ndarray:
    colours = np.array(
        [(0, 0, 0), (0, 0, 0), scene.wall_colour]
        + [s.colour for s in scene.spheres]
        + [b.colour for b in scene.boxes]
    )
    albedo = colours[ids]
    # Ground checkerboard in world x/z; squares that project smaller than ~4 px fade to their
    # mean colour, so the far ground does not alias into noise.
    g = ids == GROUND
    x, z, s = points[g, 0], points[g, 2], scene.checker
    sign = np.sin(np.pi * x / s) * np.sin(np.pi * z / s)
    fade = np.clip(scene.focal * s / np.maximum(t[g], 1e-6) / 8.0 - 0.5, 0.0, 1.0)
    mix = (0.5 + 0.5 * np.tanh(4.0 * sign) * fade)[:, None]
    c0, c1 = (np.asarray(c) for c in scene.ground_colours)
    albedo[g] = mix * c0 + (1 - mix) * c1
    if rng is not None:  # mottled surfaces: smooth noise, stronger on the wall
        texture = ndimage.gaussian_filter(rng.standard_normal(ids.shape), 1.5)
        texture /= texture.std() + 1e-12
        amount = np.where(ids == WALL, 0.12, 0.05)
        albedo = albedo * (1 + amount * texture)[..., None]
    return np.clip(albedo, 0.0, 1.0)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """3×H×W RGB → 1×H×W grey (ITU-R BT.601 weights)."""
    return np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), rgb, 1)[None]


def synth_depth(
    shape: Sequence[int] = (128, 128), *, seed: int | Sequence[int], channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """One random scene's image and depth map.

    Args:
        shape: (H, W).
        seed: int or sequence of ints; equal seeds give equal outputs.
        channels: 3 (RGB) or 1 (luminance).

    Returns:
        (image float32 C×H×W in [0, 1], depth float32 H×W in metres, NaN = not measured).

    Example:
        >>> image, depth = synth_depth((64, 64), seed=0)
        >>> image.shape, 1.0 < float(np.nanmin(depth)) < float(np.nanmax(depth)) <= 10.0
        ((3, 64, 64), True)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 8:
        raise ConfigError(f"synthetic depth: shape={shape} must be (H, W) with H, W ≥ 8")
    if channels not in (1, 3):
        raise ConfigError(f"synthetic depth: channels={channels}: use 1 or 3")
    rng = np.random.default_rng(seed)
    scene = random_scene(shape, rng)
    image, depth, _ = render_scene(scene, rng, noise=rng.uniform(0.005, 0.02))
    image = np.moveaxis(image, -1, 0)
    if channels == 1:
        image = luminance(image)
    return np.ascontiguousarray(image, dtype=np.float32), depth
