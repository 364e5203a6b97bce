"""``LLMTokenEnv``: one episode of the token MDP, as a plain :class:`gymnasium.Env`.

It is a view of :class:`~llm_mdp.envs.vector_env.LLMTokenVectorEnv` with one row and the
NumPy backend, so the MDP logic lives in one place. See that module for the observation
layout and the end-of-episode rules.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from llm_mdp.envs.vector_env import EnvStateError, LengthCap, LLMTokenVectorEnv
from llm_mdp.tasks import Task


class LLMTokenEnv(gym.Env):
    """Text generation as a Gymnasium env: one token per step, reward only at the end.

    Observation: ``{"input_ids": (W,) int64, "attention_mask": (W,) int64,
    "policy_mask": (W,) int64}`` (prompt right-aligned in the first ``P`` columns,
    response from column ``P``; ``policy_mask`` is 1 on the tokens the policy chose). Action: a
    token id in ``Discrete(vocab_size)``. Reward: 0.0 on every step except the last, which
    pays the task's response-level reward ``RM(W)``. EOS ends the episode
    (``terminated``); so does reaching ``max_response_tokens`` (``terminated`` by
    default, ``truncated`` with ``length_cap="truncated"``).

    ``reset(seed=..., options=...)`` options: ``prompt`` (text) or ``prompt_index`` (into
    ``task.prompts``), and ``response_prefix`` (list of token ids already generated), so
    any node of the response tree can be the start state.

    Multi-turn tasks (``Task.reply_fn``): an EOS ends a turn, and the same ``step``
    appends the environment's reply (its tokens are not actions: ``policy_mask`` 0) and
    goes on; the episode ends when the task stops replying, at ``max_turns`` or at the
    length cap, which counts the replies. Random replies draw from the env's generator,
    so ``reset(seed=...)`` fixes them. ``render()`` shows the turns
    (``policy: ... | env: ...``). See :mod:`llm_mdp.envs.turns`.

    When the episode ends, ``info`` holds ``prompt`` and ``response`` text (unless
    ``info_text=False``: then nothing is decoded) and, for tasks with true token-level
    rewards, ``token_rewards``: ``(R,)`` float64, ``r_t`` for the ``T`` response tokens
    and 0.0 after them. Every info entry has a fixed type and shape, so Gymnasium's
    ``SyncVectorEnv``/``AsyncVectorEnv`` can batch them.

    ``render_mode``: ``"ansi"`` (``render()`` returns ``prompt | response (status)``),
    ``"human"`` (prints it every step) or ``"rgb_array"`` (that line drawn on a fixed-size
    ``(32, 640, 3)`` uint8 image, for video recorders; needs Pillow). Pickles (the
    built-in tasks' rewards are module-level callables).
    """

    metadata: dict[str, Any] = {  # noqa: RUF012
        "render_modes": ["ansi", "human", "rgb_array"],
        "render_fps": 4,
    }

    def __init__(
        self,
        task: Task | str = "target_token",
        *,
        max_response_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        length_cap: LengthCap = "terminated",
        render_mode: str | None = None,
        info_text: bool = True,
        task_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._vec = LLMTokenVectorEnv(
            task,
            1,
            max_response_tokens=max_response_tokens,
            max_prompt_tokens=max_prompt_tokens,
            length_cap=length_cap,
            device="cpu",
            backend="numpy",
            info_text=info_text,
            task_kwargs=task_kwargs,
        )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r}, expected one of {self.metadata['render_modes']}"
            )
        self.render_mode = render_mode
        self.task = self._vec.task
        self.tokenizer = self._vec.tokenizer
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space
        self.P, self.R = self._vec.P, self._vec.R
        self._ended = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        vec_options: dict[str, Any] = {}
        # the vector env validates the values (types, ranges, legal tokens)
        if "prompt" in options:
            vec_options["prompts"] = [options.pop("prompt")]
        if "prompt_index" in options:
            vec_options["prompt_indices"] = [options.pop("prompt_index")]
        if "response_prefix" in options:
            vec_options["response_prefix"] = [options.pop("response_prefix")]
        if options:
            raise ValueError(
                f"unknown reset option(s) {sorted(options)}; known: prompt, prompt_index, "
                "response_prefix"
            )
        if "prompts" not in vec_options and "prompt_indices" not in vec_options:
            n = len(self.task.prompts)
            vec_options["prompt_indices"] = [int(self.np_random.integers(0, n))]
        if self.task.multi_turn:  # random replies: a stream drawn from this env's generator
            vec_options["reply_streams"] = [int(self.np_random.integers(0, 2**62))]
        obs, _ = self._vec.reset(options=vec_options)
        self._ended = False
        return self._row(obs), {"prompt_index": int(self._vec.prompt_index[0])}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._ended:
            raise EnvStateError("step() called after the episode ended; call reset() first")
        a = np.asarray(action)
        if a.shape not in ((), (1,)):
            raise ValueError(f"action has shape {a.shape}, expected a single token id")
        obs, reward, terminated, truncated, vinfo = self._vec.step(a.reshape(1))
        term, trunc = bool(terminated[0]), bool(truncated[0])
        self._ended = term or trunc
        info: dict[str, Any] = {}
        if self._ended:
            for key in ("prompt", "response"):
                if key in vinfo:
                    info[key] = vinfo[key][0]
            if "token_rewards" in vinfo:  # (R,): a fixed shape, whatever the length
                info["token_rewards"] = vinfo["token_rewards"][0]
        if self.render_mode == "human":
            print(self._vec.render_text())
        return self._row(obs), float(reward[0]), term, trunc, info

    def render(self) -> str | np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi'")
            return None
        text = self._vec.render_text()
        if self.render_mode == "human":
            print(text)
            return None
        if self.render_mode == "rgb_array":
            return text_frame(text)
        return text

    @staticmethod
    def _row(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in obs.items()}


FRAME_SHAPE = (32, 640, 3)
"""Shape of an ``rgb_array`` frame: fixed, as video recorders need; longer text is cut."""


def text_frame(text: str, shape: tuple[int, int, int] = FRAME_SHAPE) -> np.ndarray:
    """``text`` drawn in black on a white ``shape`` uint8 image (Pillow's default font)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise ImportError(
            "render_mode='rgb_array' draws the text with Pillow: pip install pillow"
        ) from exc
    height, width, _ = shape
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).multiline_text((4, 4), text, fill="black")
    return np.asarray(image, dtype=np.uint8)
