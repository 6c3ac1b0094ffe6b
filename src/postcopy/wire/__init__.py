"""The migration stream as a sans-IO codec: messages in, bytes out; bytes in, messages out."""
