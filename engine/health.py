"""The checks people run by eye on a new run, done by the engine.

A non-finite loss stops the run (TrainingDiverged); the rest raise flags that are printed once and listed in the
run summary: gradient-norm spikes, a norm that stays outside its healthy band, a loss that has not fallen.
"""
import math

GRAD_SPIKE = 1e3
GRAD_BAND = (0.1, 10.0)
PERSISTENT = 50  # consecutive steps outside the band before it counts as persistent
LOSS_CHECK_ITER = 100


class TrainingDiverged(RuntimeError):
    pass


class HealthMonitor:
    def __init__(self, warn=print, start_iter=0, first_loss=None):
        """A resumed run passes where it starts and the run's first loss, so the early-loss check is not
        repeated against the first loss after the resume."""
        self.warn = warn
        self.flags = []
        self.first_loss = first_loss
        self.outside = 0
        self.loss_checked = start_iter >= LOSS_CHECK_ITER

    def flag(self, iteration, kind, message):
        first = not any(f["kind"] == kind for f in self.flags)
        self.flags.append({"iter": iteration, "kind": kind, "message": message})
        if first:
            self.warn(f"health warning at iter {iteration}: {message} (further '{kind}' flags go to the run log)")

    def check(self, iteration, loss, grad_norm, last_checkpoint=None):
        """Check one optimizer step; raises TrainingDiverged on a non-finite loss or gradient norm."""
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
            raise TrainingDiverged(f"non-finite {what} at iter {iteration} (loss {loss}, grad norm {grad_norm}); "
                                   f"stopping; {kept} and was not overwritten")
        if self.first_loss is None:
            self.first_loss = loss
        if grad_norm is not None:
            if grad_norm > GRAD_SPIKE:
                self.flag(iteration, "grad_spike", f"gradient norm {grad_norm:.3g} above {GRAD_SPIKE:g}")
            self.outside = self.outside + 1 if not GRAD_BAND[0] <= grad_norm <= GRAD_BAND[1] else 0
            if self.outside == PERSISTENT:
                self.flag(iteration, "grad_band", f"gradient norm outside {GRAD_BAND} for {PERSISTENT} "
                                                  f"consecutive steps (now {grad_norm:.3g})")
                self.outside = 0
        if not self.loss_checked and iteration >= LOSS_CHECK_ITER:
            self.loss_checked = True
            if loss >= self.first_loss:
                self.flag(iteration, "loss_not_falling", f"loss {loss:.4f} after {iteration} steps is not below "
                                                         f"the first step's {self.first_loss:.4f}")
