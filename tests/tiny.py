"""Sizes of the tiny feature extractors the model tests use (the full-size structure, few and small layers)."""

D = 32  # width of the tiny extractors and transformer
TV, TA = 2, 2  # visual and audio tokens per segment of the tiny extractors
VIS_SEGMENT = (4, 3, 32, 32)  # (Tv, C, H, W)
AUD_SEGMENT = (1, 32, 26)  # (1, F, Ta)
TINY_EXTRACTORS = {
    "vfeat_extractor": dict(
        img_size=32, num_frames=4, patch_size=16, tubelet_size=2, embed_dim=D, depth=1, num_heads=2
    ),
    "afeat_extractor": dict(
        max_spec_t=26,
        num_mel_bins=32,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * D,
    ),
}
