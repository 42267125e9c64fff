"""Edge serving: the Open Inference Protocol v2 HTTP API over model workers."""
