"""A real-time voice media engine between callers (browsers over WebRTC, phones through Twilio)
and a voice assistant (VAPI, or the embedded offline one)."""

__version__ = "0.1.0"
