"""The checks people run by eye on a new run, done by the engine.

A non-finite loss stops the run (TrainingDiverged); the rest raise flags that are printed once and listed in the
run summary: gradient-norm spikes, a norm that stays outside its healthy band, a loss that has not fallen. A val loss
far above the best so far is flagged as a record for the run log's health list when it happens.
"""
import math

GRAD_SPIKE = 1e3
GRAD_BAND = (0.1, 10.0)
PERSISTENT = 50  # consecutive steps outside the band before it counts as persistent
LOSS_CHECK_ITER = 100
# A val loss this far above the best is no evaluation noise (a few hundredths of a nat with the usual eval_iters) nor
# a spike the run shakes off (tenths): 0.5 nats is each token's probability cut by 40%; the 25% keeps early
# evaluations, at several nats, from being flagged for what is ordinary wobble there.
VAL_RISE_NATS, VAL_RISE_FRACTION = 0.5, 0.25


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
        self.val_rising = False

    def flag(self, iteration, kind, message):
        first = not any(f["kind"] == kind for f in self.flags)
        self.flags.append({"iter": iteration, "kind": kind, "message": message})
        if first:
            self.warn(f"health warning at iter {iteration}: {message} (further '{kind}' flags go to the run log)")

    def check(self, iteration, loss, grad_norm, newest=None, best=None):
        """Check one optimizer step; raises TrainingDiverged on a non-finite loss or gradient norm, naming the newest
        checkpoint and the one with the best val loss, each given as (path, val loss or None)."""
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise TrainingDiverged(f"non-finite {what} at iter {iteration} (loss {loss}, grad norm {grad_norm}); "
                                   f"stopping; {kept(newest, best)}")
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

    def check_val(self, iteration, val_loss, best_val):
        """A health record for the run log when the val loss rises far above the run's best before it (once per rise:
        the next comes only after it has come back down), else None."""
        if val_loss is None or not math.isfinite(best_val):
            return None
        limit = best_val + max(VAL_RISE_NATS, VAL_RISE_FRACTION * abs(best_val))
        if val_loss <= limit:  # a NaN val loss counts as risen
            self.val_rising = False
            return None
        if self.val_rising:
            return None
        self.val_rising = True
        self.warn(f"health warning at iter {iteration}: val loss {val_loss:.4g} is far above the best so far, "
                  f"{best_val:.4f}; checkpoints from here on may be worse than the best one, which pruning keeps")
        return {"iter": iteration, "kind": "val_loss_rising", "val_loss": val_loss if math.isfinite(val_loss) else None,
                "best_val_loss": best_val, "limit": limit}


def kept(newest, best):
    """What a stopped run leaves: the newest checkpoint and the best, with their val losses."""
    if not newest or not newest[0]:
        return "no checkpoint was saved"
    if not best or best[0] == newest[0]:
        return f"the newest checkpoint is {_named(newest)}{', also the best' if best else ''}; it was not overwritten"
    return f"the newest checkpoint is {_named(newest)}, the best {_named(best)}; neither was overwritten"


def _named(checkpoint):
    path, val = checkpoint
    return f"{path} (val loss {val:.4f})" if val is not None else f"{path} (val loss not known)"
