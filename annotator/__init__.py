"""Turn raw frames into model inputs: gray, colour spaces, frame similarity."""
