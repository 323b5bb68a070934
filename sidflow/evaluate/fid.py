"""Fréchet distance between Gaussians fitted to feature sets (the FID formula), computed without scipy.sqrtm.

clean-fid calls `scipy.linalg.sqrtm(..., disp=False)`, which SciPy ≥ 1.18 no longer accepts; the trace of
sqrt(Σ1 Σ2) is computed here from the eigenvalues of Σ1^½ Σ2 Σ1^½ (symmetric PSD, so `eigh` is exact and stable).
"""

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (mu [D], sigma [D, D]) of features [N, D] in float64 (sigma with N − 1, as clean-fid)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Return ‖mu1 − mu2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½)."""
    s1 = _sqrt_psd(sigma1)
    covmean_eigs = np.linalg.eigvalsh(s1 @ sigma2 @ s1)
    tr_covmean = np.sqrt(np.clip(covmean_eigs, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
