"""The wire protocols over one engine: genserve.v1 (the native service), KServe v2 / Triton and IBM TGIS, their
conversions and status mapping, and resumable streams. KServe and TGIS reach the engine only through the
native service; the native service only through `genserve.scheduler`'s public names."""
