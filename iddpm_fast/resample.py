"""
Timestep samplers for the training objective, as in improved-diffusion's
`resample` module: uniform, and the paper's importance sampling of L_vlb with
p_t proportional to sqrt(E[L_t^2]) over the last 10 losses seen at each t.

Sampling draws from NumPy's global random state exactly as the original does,
so a seeded run picks the same timesteps.
"""

import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

__all__ = [
    "create_named_schedule_sampler",
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
]


def create_named_schedule_sampler(name, diffusion):
    """
    A ScheduleSampler by name: "uniform" or "loss-second-moment".

    :param diffusion: the diffusion object to sample timesteps for.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name} (expected 'uniform' or 'loss-second-moment')")


class ScheduleSampler(ABC):
    """
    A distribution over timesteps, used to reduce the variance of the
    objective. sample() importance-weights the draws so that the objective's
    expectation is unchanged.
    """

    @abstractmethod
    def weights(self):
        """A numpy array of positive (not necessarily normalised) weights, one per timestep."""

    def sample(self, batch_size, device):
        """
        Importance-sample timesteps for a batch.

        :return: (timesteps, weights): an int64 [batch_size] tensor of indices
                 and a float32 [batch_size] tensor of 1 / (T * p_t) loss weights.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """
        Update the weights with this rank's (timestep, loss) pairs.

        When torch.distributed is initialised, every rank's pairs are gathered
        (ranks may have different batch sizes) so that all ranks apply the same
        update in the same order; otherwise the local pairs are used directly.

        :param local_ts: an integer [N] tensor of timesteps.
        :param local_losses: a [N] tensor of losses.
        """
        if local_ts.shape != local_losses.shape or local_ts.dim() != 1:
            raise ValueError(
                f"local_ts {tuple(local_ts.shape)} and local_losses {tuple(local_losses.shape)} must be matching 1-D tensors"
            )
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.detach().tolist())
            return
        world = dist.get_world_size()
        device = local_ts.device
        sizes = [th.zeros(1, dtype=th.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, th.tensor([len(local_ts)], dtype=th.int64, device=device))
        sizes = [int(s.item()) for s in sizes]
        max_bs = max(sizes)
        # all_gather needs equal shapes: pad every rank's batch to the largest.
        padded_ts = th.zeros(max_bs, dtype=local_ts.dtype, device=device)
        padded_ts[: len(local_ts)] = local_ts
        padded_losses = th.zeros(max_bs, dtype=local_losses.dtype, device=device)
        padded_losses[: len(local_losses)] = local_losses.detach()
        ts_batches = [th.zeros_like(padded_ts) for _ in range(world)]
        loss_batches = [th.zeros_like(padded_losses) for _ in range(world)]
        dist.all_gather(ts_batches, padded_ts)
        dist.all_gather(loss_batches, padded_losses)
        timesteps = [x for batch, bs in zip(ts_batches, sizes) for x in batch[:bs].tolist()]
        losses = [x for batch, bs in zip(loss_batches, sizes) for x in batch[:bs].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update the weights with every rank's (timestep, loss) pairs. Called
        with identical arguments on all ranks: must be deterministic.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    p_t proportional to sqrt(mean of the last `history_per_term` squared
    losses at t), mixed with `uniform_prob` of the uniform distribution;
    uniform until every timestep has a full history.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        T = self.diffusion.num_timesteps
        for t, loss in zip(ts, losses):
            t = int(t)
            if not 0 <= t < T:
                raise ValueError(f"timestep {t} is outside [0, {T - 1}]")
            if not np.isfinite(loss):
                # It would poison the weights for good; the original stored it anyway.
                warnings.warn(f"LossSecondMomentResampler: ignoring non-finite loss {loss} at timestep {t}", RuntimeWarning)
                continue
            if self._loss_counts[t] == self.history_per_term:
                # Drop the oldest loss of this timestep.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def state_dict(self):
        """The loss history, as tensors (checkpoint-safe with weights_only=True)."""
        return {
            "loss_history": th.from_numpy(self._loss_history.copy()),
            "loss_counts": th.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state):
        history = state["loss_history"].double().numpy()
        counts = state["loss_counts"].long().numpy()
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"sampler state has history {history.shape} / counts {counts.shape}, "
                f"expected {self._loss_history.shape} / {self._loss_counts.shape}"
            )
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()
