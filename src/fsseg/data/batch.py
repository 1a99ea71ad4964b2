"""The episode batch contract: every dataset yields, and every method reads, these keys.

A batch is a plain ``dict[str, Tensor]`` (Lightning moves it to the device; default collate builds it),
so a method touches only the keys it needs. Shapes for batch size B, K shots, network size H x W.

Always present
  QUERY_IMG        float32 (B, 3, H, W)      normalised query image
  QUERY_MASK       int64   (B, H, W)         {0, 1, 255}: target class vs rest, 255 = ignore / padding
  SUPPORT_IMGS     float32 (B, K, 3, H, W)
  SUPPORT_MASKS    int64   (B, K, H, W)      {0, 1, 255}
  CLASS_ID         int64   (B,)              dataset class id (1-based, e.g. 1..20 for PASCAL)
  CLASS_IDX        int64   (B,)              index of the class in the split's class list
                                             (fold's novel classes at evaluation, base classes in training)
  QUERY_BASE_LABEL int64   (B, H, W)         query label restricted to base classes: base pixels keep their
                                             dataset class id, novel and background -> 0, 255 kept
                                             (CELP's latent sampling and BAM's base learner read it)
Evaluation only
  QUERY_LABEL_ORI  int64   (B, Hm, Wm)       binary {0,1,255} label at the original resolution, padded with 255
                                             to the largest original size in the batch
  ORI_SIZE         int64   (B, 2)            original (h, w) of the query image
  CONTENT_SIZE     int64   (B, 2)            (h', w') of the resized image inside the padded network input
  EPISODE_IDX      int64   (B,)              index of the episode in its manifest
"""

QUERY_IMG = "query_img"
QUERY_MASK = "query_mask"
SUPPORT_IMGS = "support_imgs"
SUPPORT_MASKS = "support_masks"
CLASS_ID = "class_id"
CLASS_IDX = "class_idx"
QUERY_BASE_LABEL = "query_base_label"
QUERY_LABEL_ORI = "query_label_ori"
ORI_SIZE = "ori_size"
CONTENT_SIZE = "content_size"
EPISODE_IDX = "episode_idx"

IGNORE_INDEX = 255

# Cached training (data.feature_cache; fsseg.data.feature_cache): the batch holds the encoder's taps instead of
# the images, one key per tap name; the model's encode step then skips the encoder. Training only.
#   QUERY_TAP + name    float16 (B, C, h, w)
#   SUPPORT_TAP + name  float16 (B, K, C, h, w)
QUERY_TAP = "query_tap/"
SUPPORT_TAP = "support_tap/"


def cached_taps(batch) -> tuple[dict, dict] | None:
    """(query taps, support taps) held by a cached training batch, or None for an image batch."""
    query = {k[len(QUERY_TAP):]: v for k, v in batch.items() if k.startswith(QUERY_TAP)}
    if not query:
        return None
    support = {k[len(SUPPORT_TAP):]: v for k, v in batch.items() if k.startswith(SUPPORT_TAP)}
    return query, support
