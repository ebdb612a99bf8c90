"""A per-subject 3D face model and head pose, fitted to mediapipe landmark tracks.

No registered morphable model is needed: the subject's own landmarks over the whole video are
enough to solve a bundle adjustment for

* one pinhole focal length for the video (principal point at the image centre, fx = fy),
* a rigid head pose per frame,
* the subject's mean 3D shape of the 478 landmarks, and
* a low-rank expression basis with per-frame coefficients.

Conventions
-----------
Cameras are OpenCV cameras (x right, y down, z forward). The head is fixed in world coordinates,
so head motion shows up as camera motion (``cam_to_world`` per frame). The world frame is the face
model's own frame, aligned with the camera of a frontal view of the face:

* +x points from the subject's right outer eye corner (mediapipe 33) to the left one (263), i.e.
  toward the image right in a frontal view (the subject's own left);
* +y points down the face (from the top of the forehead, 10, toward the chin, 152);
* +z points into the face, away from a frontal camera (right-handed);
* the origin is ``head_center_depth`` behind the centroid of the mean landmarks, near the centre
  of the head, so that head rotations are rotations about a natural pivot;
* units are metres-ish: the outer eye corners of the mean shape are ``eye_corner_distance``
  (0.09) apart, so camera distances come out at about 0.3-1.0.

Method
------
Generalised Procrustes analysis of the (x, y, z) landmarks gives initial similarity poses, the
mean shape and a PCA expression basis. The perspective problem is then solved by block-coordinate
Levenberg-Marquardt: the per-frame block (rotation, translation, expression coefficients) is a
batched Gauss-Newton solve in which the pose part is coupled over time by a robust (Huber)
second-difference smoothness penalty (a banded system, symmetric in time, so smoothing has no
lag); the global block (mean shape and basis) separates into one small system per landmark.
Expression deformations are kept free of similarity motion of a set of landmarks that
expressions do not move (:data:`RIGID_LANDMARKS`), so head motion cannot leak into the
expression coefficients. A weak data term on mediapipe's relative depth keeps the depth of the
shape and basis well posed; the contract itself is on x, y only. The focal length, which is
weakly observable, is chosen by fitting a subset of frames at a few focal lengths and picking the
lowest error plus a prior toward a typical portrait field of view.

Cost: about 2-5 ms per frame on two CPU cores (no Python loop over frames).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from avatar.progress import Progress, null_progress

log = logging.getLogger(__name__)

N_LANDMARKS = 478
# Landmarks that fix the world frame (mediapipe face-mesh topology; "left"/"right" = subject's).
_RIGHT_EYE_OUTER, _LEFT_EYE_OUTER, _FOREHEAD, _CHIN = 33, 263, 10, 152
# Landmarks that expressions barely move: upper forehead, nose bridge, eye corners and the upper
# cheeks beside the nose (the last as mirror pairs; the least-moving points of real tracks once
# head pose is removed). Expression deformations are kept free of rigid motion on this set, so
# that head motion is carried by the pose and never leaks into the expression basis.
RIGID_LANDMARKS = (
    10, 151, 9, 8, 109, 67, 103, 338, 297, 332,
    168, 6, 197, 195, 5, 4,
    33, 133, 362, 263,
    47, 277, 114, 343, 128, 357, 121, 350, 244, 464, 245, 465, 233, 453, 232, 452, 217, 437,
    126, 355, 100, 329, 188, 412, 174, 399,
)


@dataclass
class FaceModelConfig:
    """Options of :func:`fit_face_model`."""

    n_expression: int = 32
    """K, the number of expression basis vectors. With fewer than K + 2 valid frames the extra
    vectors have zero coefficients."""

    iterations: int = 6
    """Alternations of the per-frame and global blocks of the bundle adjustment."""

    pose_smoothing: float = 0.3
    """Weight of the second-difference penalty on head pose, in units of "one frame's worth of
    landmarks": 1 puts the cut-off for jitter near fps/6 (about 4 Hz at 25 fps); 0 disables it.
    The penalty is symmetric in time, so it never delays poses."""

    pose_smoothing_scale_px: float = 0.3
    """Second differences of pose (as landmark motion in pixels) above this are penalised only
    linearly (Huber), so real fast head motion survives the smoothing while jitter does not."""

    depth_weight: float = 0.05
    """Weight of mediapipe's relative depth (z) relative to x, y. It fixes the depth of the mean
    shape and expression basis, which 2D landmarks of a mostly frontal face barely observe."""

    expression_ridge: float = 1e-4
    """Ridge on expression coefficients (relative to the data term of one frame)."""

    focal: Optional[float] = None
    """Fixed focal length in pixels; None searches ``focal_range``."""

    focal_prior_fov_deg: float = 24.0
    """Field of view (across the image width) the focal search is pulled toward: a head crop of a
    webcam or phone video at arm's length."""

    focal_range: tuple[float, float] = (0.9, 6.0)
    """Focal lengths searched, as multiples of the image width."""

    focal_candidates: int = 7
    """Number of focal lengths tried (log-spaced over ``focal_range``)."""

    focal_prior_weight: float = 0.02
    """Penalty (px^2 of mean squared error per unit of log(focal / prior)^2) of the focal search."""

    focal_search_frames: int = 40
    """Valid frames (evenly spread) used by the focal search."""

    focal_search_expression: int = 8
    """Expression basis size during the focal search: a small basis cannot mimic perspective, so
    the error says more about the focal length (and the search is cheap)."""

    focal_search_iterations: int = 3
    """Alternations per focal candidate."""

    max_global_frames: int = 800
    """Frames (evenly spread over the valid ones) that the mean shape and basis are solved on;
    the per-frame block always uses every frame."""

    eye_corner_distance: float = 0.09
    """Distance between the outer eye corners of the mean shape: sets the world scale."""

    head_center_depth: float = 0.05
    """How far behind the landmark centroid the world origin is placed."""

    min_valid_frames: int = 10
    """Fewer valid frames than this is an error."""

    threads: Optional[int] = 1
    """Torch intra-op threads during the fit (the previous setting is restored afterwards); None
    leaves torch's setting alone. The fit is mostly medium-sized, memory-bound tensor work: one
    thread is nearly as fast as two on an idle machine, and several times faster when other
    work competes for the cores (threads that wait on each other spin)."""


@dataclass
class FaceModelFit:
    """Result of :func:`fit_face_model`. Arrays are float32 numpy."""

    intrinsics: np.ndarray
    """[3, 3] pinhole intrinsics: fx = fy = focal, principal point at the image centre."""
    cam_to_world: np.ndarray
    """[T, 4, 4] OpenCV camera-to-world transforms (the head is fixed in the world)."""
    face_mean: np.ndarray
    """[478, 3] the subject's mean landmark shape in world coordinates."""
    face_basis: np.ndarray
    """[K, 478, 3] orthonormal expression basis (as [K, 1434] rows), ordered by variance."""
    expression: np.ndarray
    """[T, K] expression coefficients (zero mean over valid frames)."""
    valid: np.ndarray
    """[T] bool: frames that entered the data term (others are interpolated)."""
    reprojection_error_px: float
    """Mean distance in pixels between projected model and landmarks over valid frames."""
    per_frame_error_px: np.ndarray
    """[T] mean distance per frame; NaN for invalid frames."""
    image_size: tuple[int, int] = (0, 0)
    """(width, height) of the images the landmarks live in."""
    timings: dict = field(default_factory=dict)
    """Seconds spent per stage (for benchmarks)."""

    @property
    def focal(self) -> float:
        """Focal length in pixels."""
        return float(self.intrinsics[0, 0])

    def shapes(self) -> np.ndarray:
        """Pose-free landmark shapes [T, 478, 3]: ``face_mean + expression @ face_basis``."""
        k = self.face_basis.shape[0]
        flat = self.expression @ self.face_basis.reshape(k, N_LANDMARKS * 3)
        return self.face_mean[None] + flat.reshape(len(self.expression), N_LANDMARKS, 3)

    def project(self) -> np.ndarray:
        """The model's landmarks in pixels [T, 478, 2] through each frame's camera."""
        world_to_cam = np.linalg.inv(self.cam_to_world.astype(np.float64))
        pts = self.shapes().astype(np.float64)
        cam = pts @ world_to_cam[:, :3, :3].transpose(0, 2, 1) + world_to_cam[:, None, :3, 3]
        uv = cam @ self.intrinsics.astype(np.float64).T
        return (uv[..., :2] / uv[..., 2:3]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# rotations


def _skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices [..., 3, 3] of vectors [..., 3]."""
    zero = torch.zeros_like(v[..., 0])
    return torch.stack([zero, -v[..., 2], v[..., 1],
                        v[..., 2], zero, -v[..., 0],
                        -v[..., 1], v[..., 0], zero], dim=-1).reshape(*v.shape[:-1], 3, 3)


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] from axis-angle vectors [..., 3] (Rodrigues)."""
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]
    theta = theta2.clamp_min(1e-20).sqrt()
    small = theta2 < 1e-8
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-20))
    k = _skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    return eye + a * k + b * (k @ k)


def _so3_log(rot: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors [..., 3] of rotations [..., 3, 3] with angle below pi."""
    cos = ((rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1 + 1e-6, 1.0)
    theta = torch.acos(cos)
    vee = torch.stack([rot[..., 2, 1] - rot[..., 1, 2],
                       rot[..., 0, 2] - rot[..., 2, 0],
                       rot[..., 1, 0] - rot[..., 0, 1]], dim=-1)
    sin = torch.sin(theta)
    scale = torch.where(theta < 1e-4, 0.5 + theta ** 2 / 12, theta / (2 * sin.clamp_min(1e-12)))
    return vee * scale[..., None]


# --------------------------------------------------------------------------------------------
# the model


@dataclass
class _State:
    """Parameters of the bundle adjustment (torch, float32)."""

    rot: torch.Tensor  # [T, 3, 3] world-to-camera rotations
    trans: torch.Tensor  # [T, 3] world-to-camera translations
    expr: torch.Tensor  # [T, K]
    mean: torch.Tensor  # [V, 3]
    basis: torch.Tensor  # [K, V, 3]
    focal: float

    def copy(self) -> "_State":
        return _State(self.rot.clone(), self.trans.clone(), self.expr.clone(), self.mean.clone(),
                      self.basis.clone(), self.focal)

    def subset(self, idx: torch.Tensor) -> "_State":
        return _State(self.rot[idx], self.trans[idx], self.expr[idx], self.mean, self.basis,
                      self.focal)


@dataclass
class _Data:
    """Observations and fixed weights of the bundle adjustment."""

    uv: torch.Tensor  # [T, V, 2] landmark pixels minus the principal point
    zc: torch.Tensor  # [T, V] mediapipe depth minus its per-frame mean (pixels)
    w: torch.Tensor  # [T] 1 for valid frames, 0 otherwise
    sqrt_depth_weight: float
    expr_ridge: float  # absolute ridge on expression coefficients

    def subset(self, idx: torch.Tensor) -> "_Data":
        return _Data(self.uv[idx], self.zc[idx], self.w[idx], self.sqrt_depth_weight,
                     self.expr_ridge)


def _shapes(st: _State) -> torch.Tensor:
    """Pose-free shapes [T, V, 3]."""
    k = st.basis.shape[0]
    if k == 0:
        return st.mean.expand(st.expr.shape[0], -1, -1)
    flat = st.expr @ st.basis.reshape(k, -1)
    return st.mean + flat.reshape(st.expr.shape[0], -1, 3)


def _residuals(st: _State, data: _Data):
    """Residuals [T, V, 3] (u, v, weighted depth; model minus data, pixels) and intermediates.

    Returns (res, q, p, s) with q = R X [T, V, 3], p = q + t and s = focal / mean depth [T].
    """
    q = _shapes(st) @ st.rot.transpose(1, 2)
    p = q + st.trans[:, None]
    inv_z = 1.0 / p[..., 2]
    ru = st.focal * p[..., 0] * inv_z - data.uv[..., 0]
    rv = st.focal * p[..., 1] * inv_z - data.uv[..., 1]
    depth = p[..., 2].mean(1)
    s = st.focal / depth
    rz = data.sqrt_depth_weight * (s[:, None] * (p[..., 2] - depth[:, None]) - data.zc)
    res = torch.stack([ru, rv, rz], -1) * data.w[:, None, None]
    return res, q, p, s


def _proj_rows(p: torch.Tensor, s: torch.Tensor, w: torch.Tensor, focal: float, sqrt_wz: float):
    """Factors of d(residual)/d(camera point) for points p [T, V, 3].

    The u row is fz * (e_x - xz * e_z), the v row fz * (e_y - yz * e_z) and the depth row
    cz * e_z, so a Jacobian J = A P is formed from the rows of P without small matrix products.
    Returns fz, xz, yz [T, V] and cz [T, 1]; invalid frames (w = 0) get zero rows.
    """
    inv_z = 1.0 / p[..., 2]
    fz = (focal * w)[:, None] * inv_z
    return fz, p[..., 0] * inv_z, p[..., 1] * inv_z, (sqrt_wz * s * w)[:, None]


class _Smoother:
    """Robust second-difference penalty on head pose.

    cost = lam * sum_t,j huber(W_j (pose_{t+1} - 2 pose_t + pose_{t-1})_j, delta): quadratic
    below ``delta`` pixels, so tracker jitter is smoothed away, and linear above it, so that real
    fast head motion is kept. Rotation differences are logs of relative rotations, so the penalty
    does not depend on the absolute head orientation; W converts radians and metres into pixels of
    landmark motion. The penalty is symmetric in time, so smoothing never delays poses.
    """

    def __init__(self, n_frames: int, lam: float, weights: np.ndarray, delta: float):
        self.n = n_frames
        self.lam = lam if n_frames >= 3 else 0.0
        self.w = weights.astype(np.float64)  # [6]
        self.delta = delta

    def second_diff(self, st: _State) -> np.ndarray:
        """Current second differences [T-2, 6] (rotation, translation) in pixels."""
        rel = st.rot[1:] @ st.rot[:-1].transpose(1, 2)
        phi = _so3_log(rel)  # [T-1, 3]
        drot = phi[1:] - phi[:-1]
        dtr = st.trans[2:] - 2 * st.trans[1:-1] + st.trans[:-2]
        return torch.cat([drot, dtr], 1).double().numpy() * self.w

    def cost(self, st: _State) -> float:
        if self.lam <= 0:
            return 0.0
        r = np.abs(self.second_diff(st))
        hub = np.where(r <= self.delta, r * r, 2 * self.delta * r - self.delta ** 2)
        return float(self.lam * hub.sum())

    def solve(self, s_blocks: np.ndarray, b: np.ndarray, st: _State) -> np.ndarray:
        """Pose steps [T, 6] of (blockdiag(S) + lam D^T Om D) x = -(b + lam D^T Om r), with D the
        second-difference operator (in pixels) and Om the Huber (IRLS) weights at the current r.
        """
        from scipy.linalg import solveh_banded

        n = self.n
        rhs = b.copy()
        ab = np.zeros((13, 6 * n))
        for p in range(6):
            for q in range(p + 1):
                ab[p - q, q::6] = s_blocks[:, p, q]
        if self.lam > 0:
            r = self.second_diff(st)  # [T-2, 6]
            om = np.minimum(1.0, self.delta / np.maximum(np.abs(r), 1e-12)) * self.lam
            dtr = np.zeros((n, 6))  # D^T (Om r), converted back to parameter units
            dtr[:-2] += om * r
            dtr[1:-1] -= 2 * om * r
            dtr[2:] += om * r
            rhs = rhs + dtr * self.w
            c0 = np.zeros((n, 6))
            c0[:-2] += om
            c0[1:-1] += 4 * om
            c0[2:] += om
            c1 = np.zeros((n - 1, 6))
            c1[:-1] -= 2 * om
            c1[1:] -= 2 * om
            w2 = self.w ** 2
            for p in range(6):
                ab[0, p::6] += c0[:, p] * w2[p]
                ab[6, p:6 * (n - 1):6] = c1[:, p] * w2[p]
                ab[12, p:6 * (n - 2):6] = om[:, p] * w2[p]
        try:
            x = solveh_banded(ab, -rhs.reshape(-1), lower=True, check_finite=False)
        except np.linalg.LinAlgError:  # not positive definite (NaN input): no step
            return np.zeros((n, 6))
        return x.reshape(n, 6)


def _total_cost(st: _State, data: _Data, smoother: Optional[_Smoother]) -> float:
    res, *_ = _residuals(st, data)
    cost = float((res.double() ** 2).sum()) + data.expr_ridge * float((st.expr.double() ** 2).sum())
    if smoother is not None:
        cost += smoother.cost(st)
    return cost


def _frame_normal_equations(st: _State, data: _Data, chunk: int = 32):
    """Per-frame Gauss-Newton systems: H [T, 6+K, 6+K] and g [T, 6+K] (float64).

    Unknowns per frame: rotation increment (left-multiplied, camera frame), translation,
    expression coefficients. The Jacobian rows of the u, v and depth residuals are written into
    one buffer with the residual as an extra column, so a single batched product gives H and g.
    """
    n, k = st.expr.shape
    v = st.mean.shape[0]
    m = 6 + k
    basis_t = st.basis.permute(2, 1, 0).reshape(3, v * k)  # [3, V*K]
    # buffers reused over chunks (fresh large allocations cost more than the arithmetic)
    jac_buf = torch.empty(min(chunk, n), 3, v, m + 1)
    rb_buf = torch.empty(min(chunk, n), 3, v * k)
    prod = torch.empty(n, m + 1, m + 1)
    for lo in range(0, n, chunk):
        sub = st.subset(slice(lo, lo + chunk))
        dsub = data.subset(slice(lo, lo + chunk))
        res, q, p, s = _residuals(sub, dsub)
        fz, xz, yz, cz = _proj_rows(p, s, dsub.w, st.focal, data.sqrt_depth_weight)
        c = q.shape[0]
        qx, qy, qz = q.unbind(-1)
        jac = jac_buf[:c]
        # d(camera point)/d(rotation) = -[q]x, d/d(translation) = I, d/d(expression) = R B;
        # u row: fz (e_x - xz e_z), v row: fz (e_y - yz e_z), depth row: cz e_z.
        ju, jv, jz = jac[:, 0], jac[:, 1], jac[:, 2]
        ju[..., 0] = -xz * qy
        ju[..., 1] = qz + xz * qx
        ju[..., 2] = -qy
        ju[..., 3] = 1
        ju[..., 4] = 0
        ju[..., 5] = -xz
        jv[..., 0] = -qz - yz * qy
        jv[..., 1] = yz * qx
        jv[..., 2] = qx
        jv[..., 3] = 0
        jv[..., 4] = 1
        jv[..., 5] = -yz
        jz[..., 0] = qy
        jz[..., 1] = -qx
        jz[..., 2:5] = 0
        jz[..., 5] = 1
        if k:
            rb = torch.matmul(sub.rot, basis_t, out=rb_buf[:c]).view(c, 3, v, k)  # R B
            torch.addcmul(rb[:, 0], xz[..., None], rb[:, 2], value=-1, out=ju[..., 6:m])
            torch.addcmul(rb[:, 1], yz[..., None], rb[:, 2], value=-1, out=jv[..., 6:m])
            jz[..., 6:m] = rb[:, 2]
        ju[..., :m] *= fz[..., None]
        jv[..., :m] *= fz[..., None]
        # the depth residual is relative to the frame's mean depth: centre its rows over points
        jz[..., :m] -= jz[..., :m].mean(1, keepdim=True)
        jz[..., :m] *= cz[..., None]
        jac[..., m] = res.permute(0, 2, 1)
        flat = jac.view(c, 3 * v, m + 1)
        torch.bmm(flat.transpose(1, 2), flat, out=prod[lo:lo + c])
    prod = prod.double()
    h = prod[:, :m, :m].contiguous()
    g = prod[:, :m, m].contiguous()
    if k:
        h[:, 6:, 6:] += data.expr_ridge * torch.eye(k, dtype=torch.float64)
        g[:, 6:] += data.expr_ridge * st.expr.double()
    return h, g


def _frame_step(st: _State, h: torch.Tensor, g: torch.Tensor, smoother: _Smoother,
                damping: float) -> _State:
    """One damped Gauss-Newton step of every frame's pose and expression (poses coupled in time),
    from the systems of :func:`_frame_normal_equations`."""
    n, m = g.shape
    k = m - 6
    diag = h.diagonal(dim1=1, dim2=2)
    h = h + torch.diag_embed(damping * diag + 1e-9 * diag.mean(0).clamp_min(1e-12))
    hpp, gp = h[:, :6, :6], g[:, :6]
    if k:
        hee = h[:, 6:, 6:]
        hep = h[:, 6:, :6]
        chol, _ = torch.linalg.cholesky_ex(hee)  # a failure gives NaN: the step is rejected
        x = torch.cholesky_solve(torch.cat([hep, g[:, 6:, None]], 2), chol)  # H_ee^-1 [H_ep, g_e]
        s_blocks = hpp - hep.transpose(1, 2) @ x[..., :6]
        b = gp - (hep.transpose(1, 2) @ x[..., 6:])[..., 0]
    else:
        s_blocks, b = hpp, gp
    dpose = smoother.solve(s_blocks.numpy(), b.numpy(), st)
    dpose_t = torch.from_numpy(dpose)
    new = st.copy()
    if k:
        de = -(x[..., 6:] + x[..., :6] @ dpose_t[..., None])[..., 0]
        new.expr = (st.expr.double() + de).float()
    new.rot = so3_exp(dpose_t[:, :3].float()) @ st.rot
    new.trans = st.trans + dpose_t[:, 3:].float()
    return new


def _gather_map(k1: int) -> torch.Tensor:
    """Index [(3 k1)^2] into the unique entries (pair of (mean, basis) rows, 6 entries of the
    symmetric 3x3 block) that :func:`_global_normal_equations` accumulates."""
    ik, jk = torch.triu_indices(k1, k1)
    unique3 = torch.tensor([[0, 1, 2], [1, 3, 4], [2, 4, 5]]).reshape(-1)
    a3, b3 = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    rows = (ik[:, None] * 3 + a3.reshape(1, -1)).reshape(-1)
    cols = (jk[:, None] * 3 + b3.reshape(1, -1)).reshape(-1)
    src = (torch.arange(len(ik))[:, None] * 6 + unique3[None]).reshape(-1)
    size = 3 * k1
    index = torch.zeros(size * size, dtype=torch.long)
    index[rows * size + cols] = src
    index[cols * size + rows] = src
    return index


def _global_normal_equations(st: _State, data: _Data, chunk: int = 256):
    """Gauss-Newton systems of the mean shape and basis, one per landmark: H [V, 3(K+1), 3(K+1)]
    and g [V, 3(K+1)] (float64), unknowns ordered (mean, basis 0, ..., basis K-1) x (x, y, z)."""
    n, k = st.expr.shape
    v = st.mean.shape[0]
    k1 = k + 1
    # H_v = sum_t (a_t a_t^T) kron N_tv with a_t = [1, e_t]: accumulate only the unique entries
    # of both symmetric factors as one matrix product, then scatter.
    ik, jk = torch.triu_indices(k1, k1)
    i3, j3 = torch.triu_indices(3, 3)
    h_acc = torch.zeros(len(ik), v * 6)
    g_acc = torch.zeros(k1, v * 3)
    for lo in range(0, n, chunk):
        sub = st.subset(slice(lo, lo + chunk))
        dsub = data.subset(slice(lo, lo + chunk))
        res, q, p, s = _residuals(sub, dsub)
        fz, xz, yz, cz = _proj_rows(p, s, dsub.w, st.focal, data.sqrt_depth_weight)
        r = sub.rot[:, None]  # [c, 1, 3, 3]
        # rows of d(res)/d(world point) = A R, each [c, V, 3]
        ju = fz[..., None] * (r[..., 0, :] - xz[..., None] * r[..., 2, :])
        jv = fz[..., None] * (r[..., 1, :] - yz[..., None] * r[..., 2, :])
        jz = (cz[..., None] * r[..., 2, :]).expand_as(ju)
        nrm = (ju[..., i3] * ju[..., j3] + jv[..., i3] * jv[..., j3]
               + jz[..., i3] * jz[..., j3])  # [c, V, 6] unique entries of J^T J
        gx = ju * res[..., 0:1] + jv * res[..., 1:2] + jz * res[..., 2:3]  # [c, V, 3]
        c = res.shape[0]
        coef = torch.cat([torch.ones(c, 1), sub.expr], 1)  # [c, K+1]
        outer = coef[:, ik] * coef[:, jk]
        h_acc += outer.T @ nrm.reshape(c, -1)
        g_acc += coef.T @ gx.reshape(c, -1)
    h = h_acc.reshape(len(ik), v, 6).permute(1, 0, 2).reshape(v, -1)[:, _gather_map(k1)]
    h = h.double().reshape(v, 3 * k1, 3 * k1)
    g = g_acc.double().reshape(k1, v, 3).permute(1, 0, 2).reshape(v, 3 * k1)
    return h, g


def _global_step(st: _State, h: torch.Tensor, g: torch.Tensor, damping: float) -> _State:
    """One damped Gauss-Newton step of the mean shape and basis from
    :func:`_global_normal_equations`."""
    v, m = g.shape
    k1 = m // 3
    k = k1 - 1
    diag = h.diagonal(dim1=1, dim2=2)
    floor = 1e-6 * diag.mean(1, keepdim=True).clamp_min(1e-12)
    hd = h.clone()
    hd.diagonal(dim1=1, dim2=2).add_(damping * diag + floor)
    chol, _ = torch.linalg.cholesky_ex(hd)
    half = torch.linalg.solve_triangular(chol, g[..., None], upper=False)
    step = -torch.linalg.solve_triangular(chol.mT, half, upper=True)[..., 0]
    step = step.reshape(v, k1, 3).float()
    new = st.copy()
    new.mean = st.mean + step[:, 0]
    if k:
        new.basis = st.basis + step[:, 1:].permute(1, 0, 2)
    return new


def _rigid_directions(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Infinitesimal similarity motions of ``points`` [P, 3] about ``centre`` [3]: [P*3, 7]
    (translation x, y, z; rotation about x, y, z; scale)."""
    p = points - centre
    eye = torch.eye(3, dtype=p.dtype).expand(p.shape[0], 3, 3)
    rot = -_skew(p)  # d(omega x p)/d(omega)
    return torch.cat([eye, rot, p[..., None]], 2).reshape(-1, 7)


def _remove_rigid(st: _State) -> _State:
    """Project every expression basis vector onto deformations that do not move the rigid
    landmark set (:data:`RIGID_LANDMARKS`) as a similarity transform.

    The similarity motion that best explains a basis vector on the rigid set is subtracted from
    the whole vector. Without this a flexible basis can mimic small head rotations, and the pose
    smoothness prior would then push real head motion into the expression coefficients.
    """
    k = st.basis.shape[0]
    if k == 0:
        return st
    idx = torch.tensor(RIGID_LANDMARKS)
    mean = st.mean.double()
    centre = mean[idx].mean(0)
    g_rigid = _rigid_directions(mean[idx], centre)  # [3R, 7]
    g_all = _rigid_directions(mean, centre)  # [3V, 7]
    b = st.basis.double()
    theta = torch.linalg.lstsq(g_rigid, b[:, idx].reshape(k, -1).T).solution  # [7, K]
    new = st.copy()
    new.basis = (b.reshape(k, -1) - (g_all @ theta).T).float().reshape(k, -1, 3)
    return new


def _normalize_expression(st: _State, valid: torch.Tensor) -> _State:
    """Gauge fix without changing the model: zero-mean coefficients, orthonormal basis ordered by
    variance (both over valid frames)."""
    k = st.basis.shape[0]
    if k == 0:
        return st
    new = st.copy()
    mean_e = st.expr[valid].mean(0)
    new.mean = st.mean + (mean_e @ st.basis.reshape(k, -1)).reshape(-1, 3)
    expr = st.expr - mean_e
    flat = st.basis.reshape(k, -1).double()
    qmat, rmat = torch.linalg.qr(flat.T)  # flat = R^T Q^T
    expr = expr.double() @ rmat.T
    cov = expr[valid].T @ expr[valid]
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evecs = evecs[:, order]
    basis = evecs.T @ qmat.T  # [K, 3V]
    expr = expr @ evecs
    # deterministic sign: the largest entry of each basis vector is positive
    idx = basis.abs().argmax(1)
    sign = torch.sign(basis[torch.arange(k), idx])
    sign[sign == 0] = 1
    new.basis = (basis * sign[:, None]).float().reshape(k, -1, 3)
    new.expr = (expr * sign).float()
    return new


# --------------------------------------------------------------------------------------------
# initialisation


def _procrustes_init(obs: torch.Tensor, valid: torch.Tensor, n_expr: int, eye_dist: float):
    """Similarity poses, mean shape and PCA basis from mediapipe (x, y, z) by generalised
    Procrustes analysis.

    Args:
        obs: [T, V, 3] landmarks (pixels, mediapipe z).
        valid: [T] bool.

    Returns:
        rot [T, 3, 3] (mean-shape frame to image frame), scale [T] (pixels per world unit),
        centre [T, 2] image position of the shape centroid, mean [V, 3] (centred, metric),
        basis [K, V, 3], expr [T, K].
    """
    t = obs.shape[0]
    y = obs - obs.mean(1, keepdim=True)
    yv = y[valid]
    ref = yv[0] / yv[0].norm()
    for _ in range(4):
        m = yv.transpose(1, 2) @ ref  # [n, 3, 3]: sum_v y_v ref_v^T
        u, sv, vh = torch.linalg.svd(m)
        det = torch.det(u @ vh)
        d = torch.ones_like(sv)
        d[:, 2] = det.sign()
        rot = u @ torch.diag_embed(d) @ vh
        scale = (sv * d).sum(1) / (ref * ref).sum()
        aligned = (yv @ rot) / scale[:, None, None]  # rot^T y / s
        ref = aligned.mean(0)
        ref = ref - ref.mean(0)
        ref = ref / ref.norm()
    metric = eye_dist / (ref[_LEFT_EYE_OUTER] - ref[_RIGHT_EYE_OUTER]).norm()
    mean = ref * metric
    aligned = aligned * metric
    scale = scale / metric
    # fill invalid frames from the nearest valid one
    vidx = torch.nonzero(valid)[:, 0]
    nearest = vidx[torch.argmin((torch.arange(t)[:, None] - vidx[None]).abs(), 1)]
    pos = torch.searchsorted(vidx, nearest)
    rot_all, scale_all = rot[pos], scale[pos]
    centre = obs[nearest].mean(1)[:, :2]
    n = aligned.shape[0]
    dev = (aligned - mean).reshape(n, -1)
    k_eff = min(n_expr, max(n - 2, 0))
    basis = torch.zeros(n_expr, mean.numel())
    expr = torch.zeros(t, n_expr)
    if k_eff:
        # svd_lowrank draws a random sketch: with a fixed seed (and the caller's RNG left alone)
        # the same video gives the same subject. Training amplifies the last digits of the fit
        # (2 dB apart on the demo sample between two unseeded fits, benchmarks/RESULTS.md).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, _, vmat = torch.svd_lowrank(dev, q=min(k_eff + 8, min(dev.shape)), niter=3)
        basis[:k_eff] = vmat[:, :k_eff].T
        expr[vidx] = dev @ basis.T
    return rot_all, scale_all, centre, mean, basis.reshape(n_expr, mean.shape[0], 3), expr


def _initial_state(init, focal: float, n_frames: int) -> _State:
    rot, scale, centre, mean, basis, expr = init
    depth = focal / scale
    trans = torch.stack([centre[:, 0] * depth / focal, centre[:, 1] * depth / focal, depth], 1)
    return _remove_rigid(_State(rot.clone(), trans, expr.clone(), mean.clone(), basis.clone(),
                                float(focal)))


# --------------------------------------------------------------------------------------------
# fitting


def _evenly(idx: torch.Tensor, count: int) -> torch.Tensor:
    """At most ``count`` entries of ``idx``, evenly spread."""
    if len(idx) <= count:
        return idx
    pick = torch.linspace(0, len(idx) - 1, count).round().long()
    return idx[pick]


def _run(st: _State, data: _Data, iterations: int, global_idx: torch.Tensor, smoother: _Smoother,
         report=None) -> _State:
    """Block-coordinate Levenberg-Marquardt: per iteration one damped step of the per-frame block
    (all frames) and one of the global block (frames ``global_idx``), each accepted only if it
    lowers the cost, then the gauge fixes (rigid-free, orthonormal, centred basis)."""
    valid = data.w > 0
    mu_f, mu_g = 1e-3, 1e-3
    gdata = data.subset(global_idx)
    cost = _total_cost(st, data, smoother)
    for it in range(iterations):
        h, g = _frame_normal_equations(st, data)
        for _ in range(4):
            cand = _frame_step(st, h, g, smoother, mu_f)
            c_new = _total_cost(cand, data, smoother)
            if c_new <= cost:
                st, cost, mu_f = cand, c_new, max(mu_f / 3, 1e-7)
                break
            mu_f *= 8
        gsub = st.subset(global_idx)
        gcost = _total_cost(gsub, gdata, None)
        h, g = _global_normal_equations(gsub, gdata)
        for _ in range(4):
            cand = _global_step(gsub, h, g, mu_g)
            c_new = _total_cost(cand, gdata, None)
            if c_new <= gcost:
                st.mean, st.basis = cand.mean, cand.basis
                mu_g = max(mu_g / 3, 1e-7)
                break
            mu_g *= 8
        st = _normalize_expression(_remove_rigid(st), valid)
        cost = _total_cost(st, data, smoother)
        if report is not None:
            report(it + 1)
    return st


def _mean_error(st: _State, data: _Data) -> torch.Tensor:
    """Per-frame mean reprojection distance [T] (pixels)."""
    res, *_ = _residuals(st, data)
    return res[..., :2].norm(dim=-1).mean(1)


@contextlib.contextmanager
def _torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, restoring the previous count."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def fit_face_model(
    landmarks: np.ndarray,
    valid: np.ndarray,
    image_size: tuple[int, int],
    config: Optional[FaceModelConfig] = None,
    progress: Optional[Progress] = None,
) -> FaceModelFit:
    """Fit focal length, head poses, mean shape and expression basis to landmark tracks.

    Args:
        landmarks: [T, 478, 3] mediapipe face-mesh landmarks: x, y in pixels of the image,
            z mediapipe's relative depth in pixels (smaller is closer to the camera).
        valid: [T] bool, False where tracking failed; those frames do not enter the data term
            and get poses from the smoothness prior and coefficients by interpolation.
        image_size: (width, height) of the image the landmarks are in.
        config: options, see :class:`FaceModelConfig`.
        progress: callback ``progress(step, done, total)``.

    Returns:
        :class:`FaceModelFit`.

    Raises:
        ValueError: wrong shapes, non-finite landmarks in valid frames, or fewer than
            ``config.min_valid_frames`` valid frames.
    """
    config = config or FaceModelConfig()
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {config.threads}")
    with _torch_threads(config.threads), torch.no_grad():
        return _fit_face_model(landmarks, valid, image_size, config, progress)


def _fit_face_model(landmarks, valid, image_size, config: FaceModelConfig,
                    progress: Optional[Progress]) -> FaceModelFit:
    t0 = time.perf_counter()
    report = progress or null_progress
    landmarks = np.asarray(landmarks)
    valid = np.asarray(valid)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (N_LANDMARKS, 3):
        raise ValueError(f"landmarks must be [T, {N_LANDMARKS}, 3], got {landmarks.shape}")
    if valid.shape != (landmarks.shape[0],):
        raise ValueError(f"valid must be [T] = [{landmarks.shape[0]}], got {valid.shape}")
    valid = valid.astype(bool)
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be (width, height) > 0, got {image_size}")
    n_valid = int(valid.sum())
    if n_valid < max(config.min_valid_frames, 3):
        raise ValueError(f"need at least {max(config.min_valid_frames, 3)} frames with a tracked "
                         f"face, got {n_valid} of {len(valid)}")
    if not np.isfinite(landmarks[valid]).all():
        raise ValueError("landmarks of valid frames must be finite, got NaN or inf")
    if config.n_expression < 0:
        raise ValueError(f"n_expression must be >= 0, got {config.n_expression}")
    spread = landmarks[valid, :, :2].std(1).mean()
    if not spread > 1.0:
        raise ValueError(f"landmarks must spread over more than a pixel, got {spread:.3g} px")

    width, height = int(image_size[0]), int(image_size[1])
    cx, cy = width / 2.0, height / 2.0
    n = landmarks.shape[0]
    k = config.n_expression
    timings: dict = {}

    lm = torch.from_numpy(np.nan_to_num(landmarks.astype(np.float32)))
    vt = torch.from_numpy(valid)
    w = vt.float()
    uv = lm[..., :2] - torch.tensor([cx, cy])
    zc = lm[..., 2] - lm[..., 2].mean(1, keepdim=True)
    uv[~vt] = 0
    zc[~vt] = 0
    init = _procrustes_init(lm, vt, k, config.eye_corner_distance)
    # init centre relative to the principal point
    init = (init[0], init[1], init[2] - torch.tensor([cx, cy]), *init[3:])
    timings["init"] = time.perf_counter() - t0

    vidx = torch.nonzero(vt)[:, 0]
    n_per_point = float(N_LANDMARKS)

    def make(focal: float, idx: Optional[torch.Tensor], k_use: int = k):
        st = _initial_state(init, focal, n)
        st.expr, st.basis = st.expr[:, :k_use].contiguous(), st.basis[:k_use].contiguous()
        d = _Data(uv, zc, w, math.sqrt(config.depth_weight), 0.0)
        if idx is not None:
            st, d = st.subset(idx), d.subset(idx)
        # pixels per unit: typical depth and face radius fix the smoothness and ridge weights
        depth = float(st.trans[d.w > 0, 2].median())
        radius = float(st.mean.norm(dim=1).pow(2).mean().sqrt())
        px_per_m = focal / depth
        d.expr_ridge = config.expression_ridge * px_per_m ** 2
        weights = np.array([px_per_m * radius] * 3 + [px_per_m] * 2 + [px_per_m * radius / depth])
        # a subset of frames is not consecutive in time: no smoothing there
        lam = config.pose_smoothing * n_per_point if idx is None else 0.0
        return st, d, _Smoother(st.expr.shape[0], lam, weights, config.pose_smoothing_scale_px)

    # focal length
    t1 = time.perf_counter()
    if config.focal is not None:
        if not config.focal > 0:
            raise ValueError(f"focal must be > 0, got {config.focal}")
        focal = float(config.focal)
    else:
        prior = 0.5 * width / math.tan(math.radians(config.focal_prior_fov_deg) / 2)
        cands = np.exp(np.linspace(np.log(config.focal_range[0] * width),
                                   np.log(config.focal_range[1] * width),
                                   config.focal_candidates))
        sub = _evenly(vidx, config.focal_search_frames)
        scores = []
        for i, fc in enumerate(cands):
            st, d, sm = make(float(fc), sub, min(k, config.focal_search_expression))
            st = _run(st, d, config.focal_search_iterations, torch.arange(len(sub)), sm)
            err = _residuals(st, d)[0].pow(2).sum(-1).mean()
            scores.append(float(err) + config.focal_prior_weight * math.log(fc / prior) ** 2)
            report("fit face model: focal", i + 1, len(cands))
        j = int(np.argmin(scores))
        focal = float(cands[j])
        if 0 < j < len(cands) - 1:  # parabola through the best three in log focal
            x = np.log(cands[j - 1:j + 2])
            a, b, _ = np.polyfit(x, scores[j - 1:j + 2], 2)
            if a > 0:
                focal = float(np.exp(np.clip(-b / (2 * a), x[0], x[2])))
        log.debug("focal search: %s -> %.1f", dict(zip(np.round(cands), np.round(scores, 3))),
                  focal)
    timings["focal"] = time.perf_counter() - t1

    # full fit
    t2 = time.perf_counter()
    st, data, smoother = make(focal, None)
    gidx = _evenly(vidx, config.max_global_frames)
    st = _run(st, data, config.iterations, gidx, smoother,
              report=lambda i: report("fit face model", i, config.iterations))
    timings["fit"] = time.perf_counter() - t2

    errors = _mean_error(st, data).numpy().astype(np.float64)
    fit = _export(st, valid, landmarks.shape[0], (width, height), config, errors)
    fit.timings = timings
    timings["total"] = time.perf_counter() - t0
    log.info("face model: focal %.0f px, reprojection error %.3f px over %d valid frames, %.2f s",
             fit.focal, fit.reprojection_error_px, n_valid, timings["total"])
    return fit


def _interp_invalid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linearly interpolate rows [T, D] at invalid frames from valid ones (held at the ends)."""
    out = values.copy()
    t = np.arange(len(valid))
    if valid.all():
        return out
    for j in range(values.shape[1]):
        out[~valid, j] = np.interp(t[~valid], t[valid], values[valid, j])
    return out


def _export(st: _State, valid: np.ndarray, n: int, size: tuple[int, int], cfg: FaceModelConfig,
            errors: np.ndarray) -> FaceModelFit:
    """Canonical world frame, numpy arrays and invalid-frame filling."""
    mean = st.mean.double()
    basis = st.basis.double()
    x_axis = mean[_LEFT_EYE_OUTER] - mean[_RIGHT_EYE_OUTER]
    scale = cfg.eye_corner_distance / float(x_axis.norm())
    x_axis = x_axis / x_axis.norm()
    y_axis = mean[_CHIN] - mean[_FOREHEAD]
    y_axis = y_axis - (y_axis @ x_axis) * x_axis
    y_axis = y_axis / y_axis.norm()
    z_axis = torch.linalg.cross(x_axis, y_axis)
    q = torch.stack([x_axis, y_axis, z_axis])  # world_new = scale * q (world_old - origin)
    origin = mean.mean(0) + cfg.head_center_depth / scale * z_axis
    new_mean = scale * (mean - origin) @ q.T
    new_basis = scale * basis @ q.T
    rot = st.rot.double() @ q.T
    trans = scale * (st.rot.double() @ origin + st.trans.double())
    # re-orthonormalise the expression basis after scaling
    tmp = _State(rot.float(), trans.float(), st.expr, new_mean.float(), new_basis.float(), st.focal)
    tmp = _normalize_expression(tmp, torch.from_numpy(valid))
    expr = tmp.expr.numpy()
    expr = _interp_invalid(expr, valid)
    u, _, vh = np.linalg.svd(tmp.rot.double().numpy())  # undo float32 drift from rotations
    rot = u @ vh
    trans = tmp.trans.double().numpy()
    # frames before the first / after the last valid one: hold the nearest valid pose
    vidx = np.nonzero(valid)[0]
    for sl, src in ((slice(0, vidx[0]), vidx[0]), (slice(vidx[-1] + 1, n), vidx[-1])):
        rot[sl] = rot[src]
        trans[sl] = trans[src]
    c2w = np.zeros((n, 4, 4))
    c2w[:, :3, :3] = rot.transpose(0, 2, 1)
    c2w[:, :3, 3] = -np.einsum("tji,tj->ti", rot, trans)
    c2w[:, 3, 3] = 1
    width, height = size
    intr = np.array([[st.focal, 0, width / 2.0], [0, st.focal, height / 2.0], [0, 0, 1]])
    per_frame = np.where(valid, errors, np.nan)
    return FaceModelFit(
        intrinsics=intr.astype(np.float32),
        cam_to_world=c2w.astype(np.float32),
        face_mean=tmp.mean.numpy().astype(np.float32),
        face_basis=tmp.basis.numpy().astype(np.float32),
        expression=expr.astype(np.float32),
        valid=valid.copy(),
        reprojection_error_px=float(errors[valid].mean()),
        per_frame_error_px=per_frame.astype(np.float32),
        image_size=(int(width), int(height)),
    )
