"""One config system: dataclasses as the schema (:mod:`.schema`), YAML files under ``configs/``
with presets and dotted ``key=value`` overrides merged onto it by OmegaConf (:mod:`.loading`),
the rules between keys (:mod:`.validation`), and megatron-core's configs built from it
(:mod:`.megatron`). Every error is a :class:`ConfigError` with one sentence, raised before any
process group exists."""

from megavideo.config.loading import CONFIG_DIR, dump, load_config, parse_overrides
from megavideo.config.schema import (
                                     MODEL_SECTIONS,
                                     STAGE2_TERMS,
                                     VOCAB_MULTIPLE,
                                     AlignConfig,
                                     AudioConfig,
                                     CheckpointConfig,
                                     Config,
                                     ConfigError,
                                     DataConfig,
                                     EncoderConfig,
                                     LLMConfig,
                                     ModelConfig,
                                     ObjectivesConfig,
                                     ParallelConfig,
                                     PostNormEncoderConfig,
                                     ProfileConfig,
                                     QFormerConfig,
                                     RunConfig,
                                     Stage1ModelConfig,
                                     Stage2ModelConfig,
                                     Stage3ModelConfig,
                                     TextConfig,
                                     TrainConfig,
                                     ViTConfig,
                                     padded_vocab,
)
from megavideo.config.validation import (
    FROZEN_AUDIO,
    validate,
    validate_device,
    validate_interleaving,
    validate_start,
    validate_world,
)

__all__ = [
    "CONFIG_DIR", "FROZEN_AUDIO", "MODEL_SECTIONS", "STAGE2_TERMS", "VOCAB_MULTIPLE",
    "AlignConfig", "AudioConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
    "EncoderConfig", "LLMConfig", "ModelConfig", "ObjectivesConfig", "ParallelConfig",
    "PostNormEncoderConfig", "ProfileConfig", "QFormerConfig", "RunConfig", "Stage1ModelConfig",
    "Stage2ModelConfig", "Stage3ModelConfig", "TextConfig", "TrainConfig", "ViTConfig", "dump",
    "load_config", "padded_vocab", "parse_overrides", "validate", "validate_device",
    "validate_interleaving", "validate_start", "validate_world",
]
