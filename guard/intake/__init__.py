"""Image intake: turn a request's image parts into decoded, limited, hashed images."""
