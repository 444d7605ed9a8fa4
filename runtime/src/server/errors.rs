//! Every error the HTTP layer returns, and the one exhaustive mapping from an
//! error to an HTTP status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{Error, ErrorKind};

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The request is wrong (400): malformed JSON, wrong types, bad values.
    BadRequest {
        /// What is wrong.
        message: String,
        /// The field at fault, if one is.
        param: Option<String>,
        /// A machine-readable code, if one applies.
        code: Option<&'static str>,
    },
    /// Missing or wrong API key (401).
    Unauthorized,
    /// Missing or wrong admin token on an `/admin` route (401).
    AdminUnauthorized,
    /// The admin API is off: the server was started without `--admin-token` (403).
    AdminDisabled,
    /// No servable variant has this id (404).
    VariantNotFound(String),
    /// The guardrail executor refused the change (409).
    Conflict {
        /// Why.
        message: String,
        /// A machine-readable code.
        code: &'static str,
    },
    /// The change was accepted but could not be carried out and was rolled
    /// back; serving continues on what it served before (422).
    Unprocessable {
        /// Why.
        message: String,
        /// A machine-readable code.
        code: &'static str,
    },
    /// The model named is not served here (404).
    ModelNotFound(String),
    /// No such route (404).
    RouteNotFound(String),
    /// The route exists with other methods (405).
    MethodNotAllowed,
    /// The body is larger than the limit (413).
    PayloadTooLarge(usize),
    /// The admission queue is full (429, with `Retry-After`).
    QueueFull,
    /// The server is draining before exit (503).
    ShuttingDown,
    /// The model is still loading (503).
    Loading,
    /// Something failed inside the server (500).
    Internal(String),
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { message: message.into(), param: Some(param.to_string()), code: None }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) | ApiError::VariantNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ShuttingDown | ApiError::Loading => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type` (also a metric label).
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } | ApiError::MethodNotAllowed | ApiError::PayloadTooLarge(_) => {
                "invalid_request_error"
            }
            ApiError::Unauthorized | ApiError::AdminUnauthorized => "authentication_error",
            ApiError::AdminDisabled => "permission_error",
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) | ApiError::VariantNotFound(_) => "not_found_error",
            ApiError::Conflict { .. } | ApiError::Unprocessable { .. } => "invalid_request_error",
            ApiError::QueueFull => "rate_limit_error",
            ApiError::ShuttingDown | ApiError::Loading => "service_unavailable",
            ApiError::Internal(_) => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { code, .. } => *code,
            ApiError::Unauthorized => Some("invalid_api_key"),
            ApiError::AdminUnauthorized => Some("invalid_admin_token"),
            ApiError::AdminDisabled => Some("admin_disabled"),
            ApiError::VariantNotFound(_) => Some("variant_not_found"),
            ApiError::Conflict { code, .. } | ApiError::Unprocessable { code, .. } => Some(code),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::PayloadTooLarge(_) => Some("payload_too_large"),
            ApiError::QueueFull => Some("queue_full"),
            ApiError::ShuttingDown => Some("shutting_down"),
            ApiError::Loading => Some("model_loading"),
            ApiError::RouteNotFound(_) | ApiError::MethodNotAllowed | ApiError::Internal(_) => None,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::BadRequest { message, .. } => message.clone(),
            ApiError::Unauthorized => "missing or incorrect API key: send `Authorization: Bearer KEY`".into(),
            ApiError::AdminUnauthorized => {
                "missing or incorrect admin token: send `Authorization: Bearer ADMIN_TOKEN`".into()
            }
            ApiError::AdminDisabled => "the admin API is off: start the server with --admin-token".into(),
            ApiError::VariantNotFound(m) => m.clone(),
            ApiError::Conflict { message, .. } | ApiError::Unprocessable { message, .. } => message.clone(),
            ApiError::ModelNotFound(m) => format!("the model `{m}` does not exist here; GET /v1/models lists it"),
            ApiError::RouteNotFound(p) => format!("no route {p}; GET /openapi.json lists the routes"),
            ApiError::MethodNotAllowed => "method not allowed on this route".into(),
            ApiError::PayloadTooLarge(limit) => format!("the request body is larger than {limit} bytes"),
            ApiError::QueueFull => "the server is at capacity: retry after the Retry-After delay".into(),
            ApiError::ShuttingDown => "the server is shutting down".into(),
            ApiError::Loading => "the model is still loading: retry when GET /ready answers 200".into(),
            ApiError::Internal(m) => format!("internal error: {m}"),
        }
    }

    /// The JSON body OpenAI clients parse.
    pub fn body(&self) -> serde_json::Value {
        let param = match self {
            ApiError::BadRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        json!({"error": {"message": self.message(), "type": self.error_type(), "param": param, "code": self.code()}})
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match (e.kind(), &e) {
            (ErrorKind::InvalidRequest, Error::ContextOverflow { .. }) => ApiError::BadRequest {
                message: e.to_string(),
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
            },
            (_, Error::UnknownAdapter(name)) => ApiError::ModelNotFound(name.clone()),
            (ErrorKind::InvalidRequest, _) => ApiError::BadRequest { message: e.to_string(), param: None, code: None },
            (ErrorKind::Model | ErrorKind::Fetch | ErrorKind::Internal, _) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, ApiError::QueueFull | ApiError::ShuttingDown | ApiError::Loading) {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_openai_shape() {
        for e in [
            ApiError::bad("n", "n must be positive"),
            ApiError::Unauthorized,
            ApiError::AdminUnauthorized,
            ApiError::AdminDisabled,
            ApiError::VariantNotFound("x".into()),
            ApiError::Conflict { message: "busy".into(), code: "proposal_rejected" },
            ApiError::Unprocessable { message: "bad hash".into(), code: "variant_rolled_back" },
            ApiError::ModelNotFound("x".into()),
            ApiError::RouteNotFound("/x".into()),
            ApiError::MethodNotAllowed,
            ApiError::PayloadTooLarge(10),
            ApiError::QueueFull,
            ApiError::ShuttingDown,
            ApiError::Loading,
            ApiError::Internal("boom".into()),
        ] {
            let b = e.body();
            for k in ["message", "type", "param", "code"] {
                assert!(b["error"].get(k).is_some(), "{e:?} lacks {k}");
            }
            assert!(e.status().is_client_error() || e.status().is_server_error());
        }
    }

    #[test]
    fn engine_errors_map_by_kind() {
        let e: ApiError = Error::ContextOverflow { prompt_tokens: 10, max_tokens: 10, context: 15 }.into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.body()["error"]["code"], "context_length_exceeded");
        let e: ApiError = Error::UnknownSequence(3).into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
