"""ST-GridPool in vLLM: vLLM's LLaVA-OneVision with the per-video path replaced by this project's pooling.

What changes from vLLM's `LlavaOnevisionForConditionalGeneration` (vLLM 0.32), and nothing else:
- the video token count (`STGridPoolProcessingInfo.get_num_video_tokens`) comes from `VideoPoolingSettings.num_tokens`,
  the geometry our processor and Transformers model use;
- the video vLLM profiles with (`get_num_frames_with_most_features`), which sizes its encoder cache, has the repo's
  frame count (stock: at most 16 frames, so vLLM's defaults refused the 32 or 64 frames a repo samples);
- each video's features (`_process_video_pixels`) are the projected frames pooled by `pool_video` (PTG + NSP, or a
  stock mode) and laid out by `add_video_newlines`, one video at a time (PTG mixes the frames of one video only);
- weight names: Transformers 5.x (5.17 and 5.19 alike) saves the vision tower as `vision_tower.embeddings...`, vLLM's
  SigLIP expects `vision_tower.vision_model.embeddings...` (the llava-hf Hub layout); both load, with or without the
  `model.` prefix of Transformers 4.52+ (the other renamings are stock vLLM's).
Images and text run through the stock code unchanged.
"""

import re

import torch
from vllm.logger import init_logger
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
    LlavaOnevisionVideoPixelInputs,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from configuration_stgridpool import VideoPoolingSettings
from modeling_stgridpool_llava import add_video_newlines, pool_video
from processing_stgridpool import STGridPoolProcessor

logger = init_logger(f"vllm.{__name__}")  # under "vllm.", so vLLM's log configuration shows it


def video_pooling_settings(hf_config) -> VideoPoolingSettings:
    """The ST-GridPool settings of a model config, checked against its frame size.

    A stock llava-onevision config (served with `hf_overrides={"architectures": [...]}`) has none of the fields and
    gets the paper's defaults; `hf_overrides` may set any of them. Raises ValueError, one line, for a config that is
    not LLaVA-OneVision-shaped or settings that do not fit its frames.
    """
    vision = getattr(hf_config, "vision_config", None)
    if vision is None or getattr(hf_config, "video_token_index", None) is None:
        raise ValueError(
            f"model_type={getattr(hf_config, 'model_type', None)!r} is not an ST-GridPool / LLaVA-OneVision checkpoint "
            f"(its config has no vision_config or video_token_index): allowed are repos converted with "
            f"stgridpool-convert or llava_onevision checkpoints"
        )
    settings = VideoPoolingSettings.from_config(hf_config)
    settings.check_frame_size(vision.image_size // vision.patch_size)
    return settings


class STGridPoolProcessingInfo(LlavaOnevisionProcessingInfo):
    """Video token counts from this project's geometry, profiling with the repo's frame count; pixels through this
    project's processor (same as stock for decoded frames)."""

    def get_hf_config(self):
        video_pooling_settings(self.ctx.model_config.hf_config)  # a config that is not ours: one line, before stock's
        return super().get_hf_config()

    def get_hf_processor(self, **kwargs: object):
        self.get_hf_config()  # vLLM loads the processor first: refuse a repo that is not ours before that fails
        return self.ctx.get_hf_processor(STGridPoolProcessor, **kwargs)

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        # Frames are resized to the vision tower's input, so the token grid does not depend on the frame size.
        side = self.get_vision_encoder_info().get_patch_grid_length()
        return video_pooling_settings(self.get_hf_config()).num_tokens(num_frames, side, side)

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts) -> int:
        """Frames of the video vLLM profiles with, which sizes its encoder cache: vLLM refuses a video of more
        tokens than max(this video's, max_num_batched_tokens). The repo's frame count (its video processor's
        `num_frames`), or `--limit-mm-per-prompt`'s video `num_frames` where given, as far as `seq_len` holds them
        (`mm_counts` videos in one prompt)."""
        # Stock answers at least one frame even when one frame does not fit: vLLM's profiling then fails far from
        # the cause. Refuse here, in one line, with the numbers.
        one_frame = self.get_num_video_tokens(image_width=0, image_height=0, num_frames=1)
        if one_frame > seq_len:
            settings = video_pooling_settings(self.get_hf_config())
            raise ValueError(
                f"max_model_len={seq_len} is too small for one video frame under {settings.geometry()} "
                f"({one_frame} tokens): allowed are max_model_len >= {one_frame}, or settings with fewer tokens"
            )
        options = self.ctx.model_config.get_multimodal_config().limit_per_prompt.get("video")
        frames = (options and options.num_frames) or self.get_hf_processor().video_processor.num_frames
        fitting = self._get_max_video_frames(seq_len) // max(mm_counts.get("video", 0), 1)
        if frames <= fitting:  # else such a video is longer than max_model_len, and vLLM's refusal says so
            tokens = self.get_num_video_tokens(image_width=0, image_height=0, num_frames=frames)
            logger.info_once(
                "ST-GridPool: vLLM's encoder cache is sized for videos of up to %d frames (%d tokens); for longer "
                'videos start vLLM with --limit-mm-per-prompt \'{"video": {"num_frames": N}}\', N the most '
                "frames a video will have",
                frames,
                tokens,
            )
        return max(1, min(frames, fitting))


_SIGLIP_WITHOUT_VISION_MODEL = re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)")


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor, info=STGridPoolProcessingInfo, dummy_inputs=LlavaOnevisionDummyInputsBuilder
)
class STGridPoolLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with ST-GridPool video pooling (settings from the repo's config.json)."""

    # Regexes run before the stock prefix renamings: `[model.]vision_tower.X` -> `[model.]vision_tower.vision_model.X`.
    hf_to_vllm_mapper = (
        WeightsMapper(orig_to_new_regex={_SIGLIP_WITHOUT_VISION_MODEL: r"\1vision_model."})
        | LlavaOnevisionForConditionalGeneration.hf_to_vllm_mapper
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        self.video_pooling = video_pooling_settings(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _process_video_pixels(self, inputs: LlavaOnevisionVideoPixelInputs) -> list[torch.Tensor]:
        """Videos (a [B, T, C, H, W] tensor or a list of [T_i, C, H, W]) -> one [N_i, D] tensor per video, N_i from
        `VideoPoolingSettings.num_tokens`."""
        videos = list(inputs["pixel_values_videos"])
        frames_per_video = [len(video) for video in videos]
        features = self.vision_tower(
            torch.cat(videos), feature_select_strategy=self.config.vision_feature_select_strategy
        )
        projected = self.multi_modal_projector(features)  # [sum T_i, H*W, D]
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        settings = self.video_pooling
        return [
            add_video_newlines(
                pool_video(frames.reshape(len(frames), side, side, -1), settings),
                self.image_newline,
                settings.video_newline_position,
            )
            for frames in torch.split(projected, frames_per_video)
        ]


__all__ = ["STGridPoolLlavaOnevisionForConditionalGeneration", "STGridPoolProcessingInfo", "video_pooling_settings"]
