"""jin-encoders: encoders, front-ends, the joint embedding space and output heads."""

from jin_encoders._config import StrictConfig
from jin_encoders.audio import AudioEncoder, AudioEncoderConfig
from jin_encoders.base import (
    EncoderInputError,
    EncoderOutput,
    ModalityEncoder,
    sinusoidal_positions,
    to_device,
)
from jin_encoders.custom import CustomEncoderConfig, CustomModalityEncoder
from jin_encoders.frontends import collate_images, image_to_tensor, load_audio, normalize_points
from jin_encoders.fusion import FusedSequence, FusionLayer, concat_modalities
from jin_encoders.heads import PixelDiffusionHead, RegressionHead, TextLMHead
from jin_encoders.mel import LogMelSpectrogram, mel_filterbank
from jin_encoders.points import (
    PointCloudEncoder,
    PointCloudEncoderConfig,
    farthest_point_sample,
    principal_frame,
)
from jin_encoders.resample import resample, resampled_length
from jin_encoders.space import JointEmbeddingSpace, JointEmbeddingSpaceConfig
from jin_encoders.text import TextEncoder, TextEncoderConfig
from jin_encoders.tokenizer import ByteTokenizer
from jin_encoders.vision import VisionEncoder, VisionEncoderConfig

__version__ = "0.9.1"

__all__ = [
    "AudioEncoder",
    "AudioEncoderConfig",
    "ByteTokenizer",
    "CustomEncoderConfig",
    "CustomModalityEncoder",
    "EncoderInputError",
    "EncoderOutput",
    "FusedSequence",
    "FusionLayer",
    "JointEmbeddingSpace",
    "JointEmbeddingSpaceConfig",
    "LogMelSpectrogram",
    "ModalityEncoder",
    "PixelDiffusionHead",
    "PointCloudEncoder",
    "PointCloudEncoderConfig",
    "RegressionHead",
    "StrictConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "TextLMHead",
    "VisionEncoder",
    "VisionEncoderConfig",
    "__version__",
    "collate_images",
    "concat_modalities",
    "farthest_point_sample",
    "image_to_tensor",
    "load_audio",
    "mel_filterbank",
    "normalize_points",
    "principal_frame",
    "resample",
    "resampled_length",
    "sinusoidal_positions",
    "to_device",
]
