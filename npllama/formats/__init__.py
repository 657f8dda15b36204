"""Model file formats: each module reads and writes one format, checking everything it reads."""
