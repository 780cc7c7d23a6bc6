"""One wire format each: Twilio Media Streams, WebRTC (and later SIP/RTP)."""
