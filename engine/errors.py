"""Errors a request can end with, each carrying TGI's HTTP status and `error_type`."""

from fastapi.responses import JSONResponse


class RequestError(Exception):
    status_code = 500
    error_type = "unknown"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status_code)


class ValidationError(RequestError):
    status_code = 422
    error_type = "validation"

    def __init__(self, message: str):
        super().__init__(f"Input validation error: {message}")


class OverloadedError(RequestError):
    status_code = 429
    error_type = "overloaded"

    def __init__(self):
        super().__init__("Model is overloaded")


class GenerationError(RequestError):
    status_code = 424
    error_type = "generation"


class IncompleteGenerationError(RequestError):
    status_code = 500
    error_type = "incomplete_generation"

    def __init__(self):
        super().__init__("Incomplete generation")
