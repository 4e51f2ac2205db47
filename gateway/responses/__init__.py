"""The Responses API on top of the chat path: translation (translate), the event stream and
the response object (events), and stored responses for previous_response_id (store)."""
