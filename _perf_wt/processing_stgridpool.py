"""ST-GridPool processor: LLaVA-OneVision's processor, emitting as many <video> placeholders as the model makes.

Only the video token count changes; images, text and chat templates stay stock. The count comes from
`configuration_stgridpool` (the same functions the model's config uses), so the two agree for the same settings.
"""

import math

from transformers import LlavaOnevisionProcessor

try:  # inside a Hub repo, loaded by Transformers' remote-code loader
    from .configuration_stgridpool import pooled_frame_size, validate_video_geometry, video_token_count
except ImportError:  # installed as top-level modules of this project
    from configuration_stgridpool import pooled_frame_size, validate_video_geometry, video_token_count


class STGridPoolProcessor(LlavaOnevisionProcessor):
    r"""`LlavaOnevisionProcessor` whose video placeholder count follows the ST-GridPool settings.

    Takes the stock arguments plus the geometry fields of `STGridPoolConfig`, under the same names
    (`video_pooling_mode`, `nsp_keep_ratio`, `nsp_padding`, `nsp_partial_windows`, `video_newline_position`);
    they are saved in `processor_config.json`. Keep them equal to the model's config: the converter does.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        video_pooling_mode="stgridpool",
        nsp_keep_ratio=0.25,
        nsp_padding=0,
        nsp_partial_windows=False,
        video_newline_position="one_token",
        **kwargs,
    ):
        # Every stock argument stays explicit: Transformers rebuilds processors from this signature.
        validate_video_geometry(
            video_pooling_mode=video_pooling_mode,
            nsp_keep_ratio=nsp_keep_ratio,
            nsp_padding=nsp_padding,
            nsp_partial_windows=nsp_partial_windows,
            video_newline_position=video_newline_position,
        )
        self.video_pooling_mode = video_pooling_mode
        self.nsp_keep_ratio = nsp_keep_ratio
        self.nsp_padding = nsp_padding
        self.nsp_partial_windows = nsp_partial_windows
        self.video_newline_position = video_newline_position
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    def num_video_tokens(self, num_frames: int) -> int:
        """<video> placeholders for one video of `num_frames` frames under this processor's settings."""
        side = int(math.sqrt(self.num_image_tokens))  # tokens per frame side as the vision tower emits them
        rows, cols = pooled_frame_size(
            side,
            side,
            video_pooling_mode=self.video_pooling_mode,
            nsp_keep_ratio=self.nsp_keep_ratio,
            nsp_padding=self.nsp_padding,
            nsp_partial_windows=self.nsp_partial_windows,
        )
        return video_token_count(num_frames, rows, cols, self.video_newline_position)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]
        num_frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
        return self.video_token * self.num_video_tokens(num_frames)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if video_sizes is not None:
            data.num_video_tokens = [self.num_video_tokens(num_frames) for num_frames, _, _ in video_sizes]
        return data


__all__ = ["STGridPoolProcessor"]
