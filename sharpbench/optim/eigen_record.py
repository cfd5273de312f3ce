"""Bookkeeping of amortised eigen-solves (A²SAM's Lanczos, X-SAM's power iteration).

Every solve is checked before its result is used: a non-finite eigenpair (a NaN Hessian-vector
product) is discarded, the previous geometry is kept, and the event is counted and logged. What
each solve achieved (iterations, Ritz residuals, host reads) is kept in ``method_state`` (saved in
``state_dict``) and summarised for metrics.json by :meth:`EigenSolveRecord.solve_summary`,
including one row per solve (``eigen_refreshes``: step, matrix-vector products, largest relative
residual ``‖Hv − λv‖/|λ|`` over the pairs, whether it met the tolerance), so that a reader can
check the tolerance held at every refresh of a run.
"""
from __future__ import annotations

import logging

from ..curvature import EigenInfo

log = logging.getLogger("sharpbench")


class EigenSolveRecord:
    """Mixin for optimizers that own ``method_state``; all values are python numbers."""

    def init_solve_record(self) -> None:
        self.method_state.update(
            num_nonfinite_solves=0,      # solves discarded (previous geometry kept)
            num_unconverged_solves=0,    # solves that hit the iteration cap above the tolerance
            eigen_iterations_total=0,    # matrix-vector products of all solves
            eigen_iterations_last=0,
            eigen_residuals_last=[],     # ‖Hv − λv‖ / |λ| of the last accepted solve, per pair
            num_host_syncs=0,            # device→host reads made by this optimizer (all steps)
            refresh_host_syncs_last=0,   # … on the last refresh step
            eigen_residual_max=None,     # the largest residual of any accepted solve
            eigen_refreshes=[],          # per solve: [step, matvecs, largest residual, converged]
        )

    def record_solve(self, info: EigenInfo, what: str, extra_syncs: int = 0) -> bool:
        """Count one solve; return whether its result may be used (all finite)."""
        s = self.method_state
        s["eigen_iterations_total"] += info.iterations
        s["eigen_iterations_last"] = info.iterations
        syncs = info.host_syncs + extra_syncs
        s["num_host_syncs"] += syncs
        s["refresh_host_syncs_last"] = syncs
        worst = max(info.residuals) if info.finite else float("nan")
        s.setdefault("eigen_refreshes", []).append(
            [int(s.get("step", -1)), int(info.iterations), worst, bool(info.converged)])
        if not info.finite:
            s["num_nonfinite_solves"] += 1
            log.warning("%s: the %s at step %d is not finite (a NaN/inf Hessian-vector product); "
                        "keeping the previous geometry (%d such solves so far)", type(self).__name__,
                        what, s.get("step", -1), s["num_nonfinite_solves"])
            return False
        if not info.converged:
            s["num_unconverged_solves"] += 1
        s["eigen_residuals_last"] = list(info.residuals)
        previous = s.get("eigen_residual_max")
        s["eigen_residual_max"] = worst if previous is None else max(previous, worst)
        return True

    def solve_summary(self) -> dict:
        """The eigen-solve record for metrics.json."""
        s = self.method_state
        solves = s.get("num_eigen_solves", 0)
        return {
            "eigen_solves": solves,
            "eigen_iterations_mean": s["eigen_iterations_total"] / solves if solves else None,
            "eigen_iterations_last": s["eigen_iterations_last"] if solves else None,
            "eigen_residuals_last": s["eigen_residuals_last"] or None,
            "eigen_unconverged_solves": s["num_unconverged_solves"],
            "eigen_nonfinite_solves": s["num_nonfinite_solves"],
            "optimizer_host_syncs": s["num_host_syncs"],
            "host_syncs_per_refresh": (s["num_host_syncs"] / solves) if solves else None,
            "eigen_tol": self.eigen_tol,
            "eigen_residual_max": s.get("eigen_residual_max"),
            "eigen_refreshes": list(s.get("eigen_refreshes", [])),
        }

    @property
    def eigen_tol(self) -> float | None:
        """The residual tolerance each solve must meet (``None``: a fixed number of iterations)."""
        return None
