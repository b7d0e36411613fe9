//! The KServe v2 REST protocol's inference messages, as Triton serves them, translated to and
//! from the gRPC messages the Python codec reads and writes.
//!
//! This is an encoding, as protobuf's is: a JSON request (with Triton's binary tensor data
//! extension) becomes the ModelInferRequest that means the same, and the ModelInferResponse
//! that answers it becomes JSON again, each output as JSON data or as binary data, as the
//! request asked. What a request means (sequence parameters, names, datatypes against the
//! model, shapes against the model, values) is decided by the Python codec and engine alone,
//! exactly as for a gRPC request; what is decided here is only what JSON itself decides: the
//! body parses, its tensors' `data` holds as many values of the datatype as the shape says
//! (Triton's HTTP frontend checks the same, "Unable to parse 'data'"), binary data sizes add
//! up to the body's.
//!
//! Sources: the KServe v2 protocol (kserve/open-inference-protocol, "HTTP/REST"), Triton's
//! binary tensor data extension (docs/protocol/extension_binary_data.md) and sequence
//! extension (extension_sequence.md).

use std::collections::HashMap;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use serde_json::{Map, Value};

/// A request the JSON layer refuses: the client's to fix (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct RestError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, RestError> {
    Err(RestError(message.into()))
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferParameter {
    #[prost(oneof = "ParameterChoice", tags = "1, 2, 3, 4, 5")]
    pub choice: Option<ParameterChoice>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterChoice {
    #[prost(bool, tag = "1")]
    Bool(bool),
    #[prost(int64, tag = "2")]
    Int64(i64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(double, tag = "4")]
    Double(f64),
    #[prost(uint64, tag = "5")]
    Uint64(u64),
}

type Parameters = HashMap<String, InferParameter>;

#[derive(Clone, PartialEq, prost::Message)]
pub struct InputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: Parameters,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestedOutput {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(map = "string, message", tag = "2")]
    pub parameters: Parameters,
}

/// inference.ModelInferRequest, but typed `contents` (the JSON data travels as raw bytes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferRequest {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: Parameters,
    #[prost(message, repeated, tag = "5")]
    pub inputs: Vec<InputTensor>,
    #[prost(message, repeated, tag = "6")]
    pub outputs: Vec<RequestedOutput>,
    #[prost(bytes = "bytes", repeated, tag = "7")]
    pub raw_input_contents: Vec<Bytes>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OutputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: Parameters,
}

/// inference.ModelInferResponse, but typed `contents` (the Python codec writes raw bytes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferResponse {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: Parameters,
    #[prost(message, repeated, tag = "5")]
    pub outputs: Vec<OutputTensor>,
    #[prost(bytes = "bytes", repeated, tag = "6")]
    pub raw_output_contents: Vec<Bytes>,
}

/// Which outputs an answer carries as binary data (Triton's `binary_data` output parameter,
/// and its request-wide default `binary_data_output`), the rest as JSON.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BinaryOutputs {
    default: bool,
    named: Vec<(String, bool)>,
}

impl BinaryOutputs {
    /// Every output binary, or every output JSON.
    pub fn all(binary: bool) -> Self {
        Self {
            default: binary,
            named: Vec::new(),
        }
    }

    fn binary(&self, name: &str) -> bool {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.default, |(_, b)| *b)
    }
}

/// The parameters that choose the answer's encoding: the JSON layer's, never forwarded.
const BINARY_DATA: &str = "binary_data";
const BINARY_DATA_OUTPUT: &str = "binary_data_output";
const BINARY_DATA_SIZE: &str = "binary_data_size";

/// The ModelInferRequest (wire bytes) that a v2 REST inference request to `model` (and
/// `version`, "" for the server's choice) means, and how its answer is to be encoded.
///
/// `body` is the request's body; `header_length` the `Inference-Header-Content-Length`
/// header's value when the body carries binary data after its JSON.
pub fn decode_request(
    model: &str,
    version: &str,
    body: &Bytes,
    header_length: Option<usize>,
) -> Result<(Bytes, BinaryOutputs), RestError> {
    let json_end = match header_length {
        Some(n) if n > body.len() => {
            return refuse(format!(
                "Inference-Header-Content-Length is {n}, but the body has only {} bytes",
                body.len()
            ));
        }
        Some(n) => n,
        None => body.len(),
    };
    let header: Value = serde_json::from_slice(&body[..json_end])
        .or_else(|e| refuse(format!("the request body is not JSON: {e}")))?;
    let Value::Object(mut header) = header else {
        return refuse("the request body must be a JSON object");
    };
    let mut binary = body.slice(json_end..);
    let mut request = ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        ..Default::default()
    };
    match header.remove("id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) => request.id = id,
        Some(_) => return refuse("'id' must be a string"),
    }
    let mut outputs = BinaryOutputs::default();
    if let Some(parameters) = header.remove("parameters") {
        request.parameters = parameters_of(parameters, "parameters")?;
        if let Some(p) = request.parameters.remove(BINARY_DATA_OUTPUT) {
            outputs.default = flag(&p, BINARY_DATA_OUTPUT)?;
        }
    }
    let Some(Value::Array(inputs)) = header.remove("inputs") else {
        return refuse("the request must have 'inputs', an array of tensors");
    };
    for input in inputs {
        let (tensor, raw) = input_of(input, &mut binary)?;
        request.inputs.push(tensor);
        request.raw_input_contents.push(raw);
    }
    if !binary.is_empty() {
        return refuse(format!(
            "the body has {} bytes of binary data after the tensors' binary_data_size",
            binary.len()
        ));
    }
    match header.remove("outputs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(requested)) => {
            for output in requested {
                let Value::Object(mut output) = output else {
                    return refuse("each of 'outputs' must be an object");
                };
                let Some(Value::String(name)) = output.remove("name") else {
                    return refuse("each of 'outputs' must have a 'name', a string");
                };
                let mut parameters = match output.remove("parameters") {
                    Some(p) => parameters_of(p, &format!("output {name}: parameters"))?,
                    None => Parameters::new(),
                };
                if let Some(p) = parameters.remove(BINARY_DATA) {
                    outputs.named.push((name.clone(), flag(&p, BINARY_DATA)?));
                }
                request.outputs.push(RequestedOutput { name, parameters });
            }
        }
        Some(_) => return refuse("'outputs' must be an array"),
    }
    let mut wire = BytesMut::with_capacity(request.encoded_len());
    request
        .encode(&mut wire)
        .expect("a BytesMut of the encoded length has room");
    Ok((wire.freeze(), outputs))
}

fn flag(parameter: &InferParameter, name: &str) -> Result<bool, RestError> {
    match parameter.choice {
        Some(ParameterChoice::Bool(b)) => Ok(b),
        _ => refuse(format!("parameter {name} must be true or false")),
    }
}

/// A JSON object of parameters as the protocol's InferParameters: a boolean, an integer
/// (int64, or uint64 above int64's range), a number or a string each.
fn parameters_of(value: Value, what: &str) -> Result<Parameters, RestError> {
    let Value::Object(map) = value else {
        return refuse(format!("'{what}' must be an object"));
    };
    let mut parameters = Parameters::with_capacity(map.len());
    for (key, value) in map {
        let choice = match value {
            Value::Bool(b) => ParameterChoice::Bool(b),
            Value::String(s) => ParameterChoice::String(s),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    ParameterChoice::Int64(i)
                } else if let Some(u) = n.as_u64() {
                    ParameterChoice::Uint64(u)
                } else {
                    ParameterChoice::Double(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            _ => {
                return refuse(format!(
                    "{what}: {key} must be a boolean, a number or a string"
                ));
            }
        };
        parameters.insert(
            key,
            InferParameter {
                choice: Some(choice),
            },
        );
    }
    Ok(parameters)
}

/// One of `inputs`: its tensor and its raw little-endian bytes, from its JSON `data` or from
/// the next `binary_data_size` bytes of `binary`.
fn input_of(value: Value, binary: &mut Bytes) -> Result<(InputTensor, Bytes), RestError> {
    let Value::Object(mut input) = value else {
        return refuse("each of 'inputs' must be an object");
    };
    let Some(Value::String(name)) = input.remove("name") else {
        return refuse("each of 'inputs' must have a 'name', a string");
    };
    let Some(Value::String(datatype)) = input.remove("datatype") else {
        return refuse(format!("input {name}: 'datatype' must be a string"));
    };
    let Some(Value::Array(dims)) = input.remove("shape") else {
        return refuse(format!(
            "input {name}: 'shape' must be an array of integers"
        ));
    };
    let mut shape = Vec::with_capacity(dims.len());
    for dim in &dims {
        match dim.as_i64() {
            Some(d) => shape.push(d),
            None => {
                return refuse(format!(
                    "input {name}: 'shape' must be an array of integers"
                ));
            }
        }
    }
    let mut parameters = match input.remove("parameters") {
        Some(p) => parameters_of(p, &format!("input {name}: parameters"))?,
        None => Parameters::new(),
    };
    let size = parameters.remove(BINARY_DATA_SIZE);
    let data = input.remove("data");
    let raw = match (size, data) {
        (Some(size), None) => {
            let n = match size.choice {
                Some(ParameterChoice::Int64(n)) if n >= 0 => n as u64,
                Some(ParameterChoice::Uint64(n)) => n,
                _ => {
                    return refuse(format!(
                        "input {name}: binary_data_size must be a non-negative integer"
                    ));
                }
            };
            if n > binary.len() as u64 {
                return refuse(format!(
                    "input {name}: binary_data_size is {n}, but only {} bytes of binary data \
                     are left in the body",
                    binary.len()
                ));
            }
            binary.split_to(n as usize)
        }
        (None, Some(data)) => json_data(&name, &datatype, &shape, &data)?,
        (Some(_), Some(_)) => {
            return refuse(format!(
                "input {name}: give its 'data' or its binary_data_size, not both"
            ));
        }
        (None, None) => {
            return refuse(format!(
                "input {name}: it has neither 'data' nor a binary_data_size parameter"
            ));
        }
    };
    let tensor = InputTensor {
        name,
        datatype,
        shape,
        parameters,
    };
    Ok((tensor, raw))
}

/// How one element of a datatype is written as raw bytes from JSON.
#[derive(Clone, Copy)]
enum Element {
    Bool,
    Signed(u8),
    Unsigned(u8),
    Fp32,
    Fp64,
    Bytes,
}

fn element_of(datatype: &str) -> Option<Element> {
    Some(match datatype {
        "BOOL" => Element::Bool,
        "INT8" => Element::Signed(1),
        "INT16" => Element::Signed(2),
        "INT32" => Element::Signed(4),
        "INT64" => Element::Signed(8),
        "UINT8" => Element::Unsigned(1),
        "UINT16" => Element::Unsigned(2),
        "UINT32" => Element::Unsigned(4),
        "UINT64" => Element::Unsigned(8),
        "FP32" => Element::Fp32,
        "FP64" => Element::Fp64,
        "BYTES" => Element::Bytes,
        _ => return None,
    })
}

/// A tensor's JSON `data` (flat, or nested row-major) as raw little-endian bytes, holding
/// exactly as many values as `shape` says. A datatype JSON cannot carry (FP16, BF16) must
/// come as binary data; one the protocol does not know goes on empty, for the codec to refuse
/// by name.
fn json_data(name: &str, datatype: &str, shape: &[i64], data: &Value) -> Result<Bytes, RestError> {
    let Some(element) = element_of(datatype) else {
        if matches!(datatype, "FP16" | "BF16") {
            return refuse(format!(
                "input {name}: {datatype} has no JSON form; send it as binary data \
                 (binary_data_size, Triton's binary tensor data extension)"
            ));
        }
        return Ok(Bytes::new());
    };
    let mut out = Vec::new();
    let mut count = 0u64;
    write_values(name, datatype, element, data, &mut out, &mut count)?;
    if shape.iter().all(|&d| d >= 0) {
        let expected = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        if expected != count {
            return refuse(format!(
                "input {name}: shape {shape:?} holds {expected} values, but its 'data' has {count}"
            ));
        }
    }
    Ok(Bytes::from(out))
}

fn write_values(
    name: &str,
    datatype: &str,
    element: Element,
    value: &Value,
    out: &mut Vec<u8>,
    count: &mut u64,
) -> Result<(), RestError> {
    if let Value::Array(items) = value {
        for item in items {
            write_values(name, datatype, element, item, out, count)?;
        }
        return Ok(());
    }
    *count += 1;
    let wrong = || {
        RestError(format!(
            "input {name}: 'data' holds {value}, which is not a {datatype} value"
        ))
    };
    match element {
        Element::Bool => out.push(value.as_bool().ok_or_else(wrong)? as u8),
        Element::Signed(width) => {
            let v = value.as_i64().ok_or_else(wrong)?;
            let bits = u32::from(width) * 8;
            if bits < 64 && (v < -(1i64 << (bits - 1)) || v >= (1i64 << (bits - 1))) {
                return Err(wrong());
            }
            out.extend_from_slice(&v.to_le_bytes()[..usize::from(width)]);
        }
        Element::Unsigned(width) => {
            let v = value.as_u64().ok_or_else(wrong)?;
            let bits = u32::from(width) * 8;
            if bits < 64 && v >= (1u64 << bits) {
                return Err(wrong());
            }
            out.extend_from_slice(&v.to_le_bytes()[..usize::from(width)]);
        }
        Element::Fp32 => {
            out.extend_from_slice(&(value.as_f64().ok_or_else(wrong)? as f32).to_le_bytes())
        }
        Element::Fp64 => out.extend_from_slice(&value.as_f64().ok_or_else(wrong)?.to_le_bytes()),
        Element::Bytes => {
            let s = value.as_str().ok_or_else(wrong)?;
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    Ok(())
}

/// An encoded answer: the body, and the length of its JSON part when binary data follows it
/// (the `Inference-Header-Content-Length` header's value).
pub struct Encoded {
    pub body: Bytes,
    pub header_length: Option<usize>,
}

/// A ModelInferResponse's wire bytes as the v2 REST answer, each output as `outputs` asks.
/// An answer that does not decode is the server's fault: the error says so.
pub fn encode_response(wire: &[u8], outputs: &BinaryOutputs) -> Result<Encoded, String> {
    let response = ModelInferResponse::decode(wire)
        .map_err(|e| format!("the engine's answer does not decode: {e}"))?;
    encode_decoded(&response, outputs)
}

/// inference.ModelStreamInferResponse: an answer on a stream, or its error in-band.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelStreamInferResponse {
    #[prost(string, tag = "1")]
    pub error_message: String,
    #[prost(message, optional, tag = "2")]
    pub infer_response: Option<ModelInferResponse>,
}

/// A stream answer's wire bytes as the v2 REST answer (`encode_response`), or, for an error,
/// `{"id", "model_name", "model_version", "error"}` with its in-band "[CODE] message".
pub fn encode_stream_response(wire: &[u8], outputs: &BinaryOutputs) -> Result<Encoded, String> {
    let answer = ModelStreamInferResponse::decode(wire)
        .map_err(|e| format!("the engine's answer does not decode: {e}"))?;
    let response = answer.infer_response.unwrap_or_default();
    if answer.error_message.is_empty() {
        return encode_decoded(&response, outputs);
    }
    let mut json = String::with_capacity(answer.error_message.len() + 96);
    json.push('{');
    if !response.id.is_empty() {
        json.push_str("\"id\":");
        push_str(&mut json, &response.id);
        json.push(',');
    }
    json.push_str("\"model_name\":");
    push_str(&mut json, &response.model_name);
    json.push_str(",\"model_version\":");
    push_str(&mut json, &response.model_version);
    json.push_str(",\"error\":");
    push_str(&mut json, &answer.error_message);
    json.push('}');
    Ok(Encoded {
        body: Bytes::from(json),
        header_length: None,
    })
}

/// `{"id"?, "model_name", "model_version", "error"}`: a stream request refused before it
/// reached the engine (it does not parse), answered in-band as the engine answers its own.
pub fn stream_refusal(id: Option<&str>, model: &str, version: &str, message: &str) -> Bytes {
    let mut json = String::with_capacity(message.len() + 96);
    json.push('{');
    if let Some(id) = id {
        json.push_str("\"id\":");
        push_str(&mut json, id);
        json.push(',');
    }
    json.push_str("\"model_name\":");
    push_str(&mut json, model);
    json.push_str(",\"model_version\":");
    push_str(&mut json, version);
    json.push_str(",\"error\":");
    push_str(&mut json, &format!("[INVALID_ARGUMENT] {message}"));
    json.push('}');
    Bytes::from(json)
}

/// The request's `id`, if its body is a JSON object that has one (for a refusal's echo).
pub fn request_id(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(mut map) => match map.remove("id") {
            Some(Value::String(id)) => Some(id),
            _ => None,
        },
        _ => None,
    }
}

fn encode_decoded(
    response: &ModelInferResponse,
    outputs: &BinaryOutputs,
) -> Result<Encoded, String> {
    let wire_len: usize = response.raw_output_contents.iter().map(|b| b.len()).sum();
    let mut json = String::with_capacity(256 + wire_len * 3);
    json.push('{');
    if !response.id.is_empty() {
        json.push_str("\"id\":");
        push_str(&mut json, &response.id);
        json.push(',');
    }
    json.push_str("\"model_name\":");
    push_str(&mut json, &response.model_name);
    json.push_str(",\"model_version\":");
    push_str(&mut json, &response.model_version);
    if !response.parameters.is_empty() {
        json.push_str(",\"parameters\":");
        push_parameters(&mut json, &response.parameters, None);
    }
    json.push_str(",\"outputs\":[");
    let mut binary: Vec<&Bytes> = Vec::new();
    for (i, output) in response.outputs.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let raw = response
            .raw_output_contents
            .get(i)
            .ok_or_else(|| format!("the engine's answer has no data for output {}", output.name))?;
        json.push_str("{\"name\":");
        push_str(&mut json, &output.name);
        json.push_str(",\"datatype\":");
        push_str(&mut json, &output.datatype);
        json.push_str(",\"shape\":[");
        for (j, d) in output.shape.iter().enumerate() {
            if j > 0 {
                json.push(',');
            }
            let _ = write!(json, "{d}");
        }
        json.push(']');
        let as_binary = outputs.binary(&output.name) || element_of(&output.datatype).is_none();
        if as_binary || !output.parameters.is_empty() {
            json.push_str(",\"parameters\":");
            let size = as_binary.then_some(raw.len());
            push_parameters(&mut json, &output.parameters, size);
        }
        if as_binary {
            binary.push(raw);
        } else {
            json.push_str(",\"data\":");
            push_data(&mut json, &output.datatype, raw)?;
        }
        json.push('}');
    }
    json.push_str("]}");
    if binary.is_empty() {
        return Ok(Encoded {
            body: Bytes::from(json),
            header_length: None,
        });
    }
    let header_length = json.len();
    let total = header_length + binary.iter().map(|b| b.len()).sum::<usize>();
    let mut body = BytesMut::with_capacity(total);
    body.put_slice(json.as_bytes());
    for part in binary {
        body.put_slice(part);
    }
    Ok(Encoded {
        body: body.freeze(),
        header_length: Some(header_length),
    })
}

/// `{"error": message}`, Triton's error body.
pub fn error_body(message: &str) -> Bytes {
    let mut json = String::with_capacity(message.len() + 16);
    json.push_str("{\"error\":");
    push_str(&mut json, message);
    json.push('}');
    Bytes::from(json)
}

fn push_str(json: &mut String, text: &str) {
    json.push_str(&serde_json::to_string(text).expect("a string always serializes"));
}

fn push_parameters(json: &mut String, parameters: &Parameters, binary_size: Option<usize>) {
    json.push('{');
    let mut first = true;
    let mut names: Vec<&String> = parameters.keys().collect();
    names.sort();
    for name in names {
        let Some(choice) = &parameters[name].choice else {
            continue;
        };
        if !std::mem::take(&mut first) {
            json.push(',');
        }
        push_str(json, name);
        json.push(':');
        match choice {
            ParameterChoice::Bool(b) => json.push_str(if *b { "true" } else { "false" }),
            ParameterChoice::Int64(i) => {
                let _ = write!(json, "{i}");
            }
            ParameterChoice::Uint64(u) => {
                let _ = write!(json, "{u}");
            }
            ParameterChoice::Double(d) => push_f64(json, *d),
            ParameterChoice::String(s) => push_str(json, s),
        }
    }
    if let Some(size) = binary_size {
        if !first {
            json.push(',');
        }
        let _ = write!(json, "\"{BINARY_DATA_SIZE}\":{size}");
    }
    json.push('}');
}

fn push_f64(json: &mut String, value: f64) {
    if value.is_finite() {
        json.push_str(ryu::Buffer::new().format_finite(value));
    } else {
        json.push_str("null"); // JSON has no NaN or infinity
    }
}

fn push_f32(json: &mut String, value: f32) {
    if value.is_finite() {
        json.push_str(ryu::Buffer::new().format_finite(value));
    } else {
        json.push_str("null");
    }
}

/// Raw little-endian `raw` of `datatype` as a flat JSON array.
fn push_data(json: &mut String, datatype: &str, raw: &[u8]) -> Result<(), String> {
    let element = element_of(datatype).ok_or_else(|| format!("no JSON form for {datatype}"))?;
    json.push('[');
    let mut first = true;
    let mut sep = |json: &mut String| {
        if !std::mem::take(&mut first) {
            json.push(',');
        }
    };
    let bad = || format!("the engine's {datatype} data has {} bytes", raw.len());
    match element {
        Element::Bool => {
            for b in raw {
                sep(json);
                json.push_str(if *b != 0 { "true" } else { "false" });
            }
        }
        Element::Signed(width) | Element::Unsigned(width) => {
            let width = usize::from(width);
            if raw.len() % width != 0 {
                return Err(bad());
            }
            let signed = matches!(element, Element::Signed(_));
            let mut buffer = itoa::Buffer::new();
            for chunk in raw.chunks_exact(width) {
                sep(json);
                let text = match (signed, width) {
                    (true, 1) => buffer.format(chunk[0] as i8),
                    (true, 2) => buffer.format(i16::from_le_bytes([chunk[0], chunk[1]])),
                    (true, 4) => buffer.format(i32::from_le_bytes(chunk.try_into().expect("4"))),
                    (true, _) => buffer.format(i64::from_le_bytes(chunk.try_into().expect("8"))),
                    (false, 1) => buffer.format(chunk[0]),
                    (false, 2) => buffer.format(u16::from_le_bytes([chunk[0], chunk[1]])),
                    (false, 4) => buffer.format(u32::from_le_bytes(chunk.try_into().expect("4"))),
                    (false, _) => buffer.format(u64::from_le_bytes(chunk.try_into().expect("8"))),
                };
                json.push_str(text);
            }
        }
        Element::Fp32 => {
            if raw.len() % 4 != 0 {
                return Err(bad());
            }
            for chunk in raw.chunks_exact(4) {
                sep(json);
                push_f32(json, f32::from_le_bytes(chunk.try_into().expect("4")));
            }
        }
        Element::Fp64 => {
            if raw.len() % 8 != 0 {
                return Err(bad());
            }
            for chunk in raw.chunks_exact(8) {
                sep(json);
                push_f64(json, f64::from_le_bytes(chunk.try_into().expect("8")));
            }
        }
        Element::Bytes => {
            let mut rest = raw;
            while !rest.is_empty() {
                if rest.len() < 4 {
                    return Err(bad());
                }
                let n = u32::from_le_bytes(rest[..4].try_into().expect("4")) as usize;
                let item = rest.get(4..4 + n).ok_or_else(bad)?;
                sep(json);
                push_str(json, &String::from_utf8_lossy(item));
                rest = &rest[4 + n..];
            }
        }
    }
    json.push(']');
    Ok(())
}

/// The body of a JSON object request whose fields are all optional (repository index, load,
/// unload): an empty body is an empty object.
pub fn optional_object(body: &[u8]) -> Result<Map<String, Value>, RestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => refuse("the request body must be a JSON object"),
        Err(e) => refuse(format!("the request body is not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<(ModelInferRequest, BinaryOutputs), RestError> {
        let (wire, outputs) = decode_request("m", "", &Bytes::from(json.to_owned()), None)?;
        Ok((ModelInferRequest::decode(wire).unwrap(), outputs))
    }

    #[test]
    fn json_data_becomes_raw_little_endian_bytes_of_its_datatype() {
        let (request, _) = decode(
            r#"{"id":"r","inputs":[
                {"name":"a","datatype":"INT64","shape":[1,2],"data":[[5,-6]]},
                {"name":"b","datatype":"FP32","shape":[2],"data":[0.5,2]},
                {"name":"c","datatype":"BOOL","shape":[1],"data":[true]},
                {"name":"d","datatype":"UINT8","shape":[1],"data":[255]}]}"#,
        )
        .unwrap();
        assert_eq!(request.id, "r");
        assert_eq!(request.model_name, "m");
        assert_eq!(request.inputs[0].shape, vec![1, 2]);
        let a: Vec<u8> = [5i64.to_le_bytes(), (-6i64).to_le_bytes()].concat();
        assert_eq!(request.raw_input_contents[0], Bytes::from(a));
        let b: Vec<u8> = [0.5f32.to_le_bytes(), 2f32.to_le_bytes()].concat();
        assert_eq!(request.raw_input_contents[1], Bytes::from(b));
        assert_eq!(request.raw_input_contents[2], Bytes::from_static(&[1]));
        assert_eq!(request.raw_input_contents[3], Bytes::from_static(&[255]));
    }

    #[test]
    fn sequence_parameters_keep_their_json_types() {
        let (request, _) = decode(
            r#"{"inputs":[],"parameters":{"sequence_id":42,"sequence_start":true,
                "sequence_version":3,"name":"x","big":18446744073709551615,"f":0.5}}"#,
        )
        .unwrap();
        let p = |k: &str| request.parameters[k].choice.clone().unwrap();
        assert_eq!(p("sequence_id"), ParameterChoice::Int64(42));
        assert_eq!(p("sequence_start"), ParameterChoice::Bool(true));
        assert_eq!(p("sequence_version"), ParameterChoice::Int64(3));
        assert_eq!(p("name"), ParameterChoice::String("x".into()));
        assert_eq!(p("big"), ParameterChoice::Uint64(u64::MAX));
        assert_eq!(p("f"), ParameterChoice::Double(0.5));
    }

    #[test]
    fn binary_data_is_cut_from_the_body_after_the_json_header() {
        let header = r#"{"inputs":[{"name":"a","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":4}},
            {"name":"b","datatype":"INT64","shape":[1],"data":[7]}],
            "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        let (wire, outputs) =
            decode_request("m", "1", &Bytes::from(body), Some(header.len())).unwrap();
        let request = ModelInferRequest::decode(wire).unwrap();
        assert_eq!(request.model_version, "1");
        assert_eq!(
            request.raw_input_contents[0],
            Bytes::from(1.5f32.to_le_bytes().to_vec())
        );
        assert!(
            request.inputs[0].parameters.is_empty(),
            "binary_data_size is the JSON layer's"
        );
        assert!(outputs.binary("y"));
        assert!(!outputs.binary("z"));
        assert!(request.outputs[0].parameters.is_empty());
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let says = |json: &str, part: &str| {
            let error = decode(json).unwrap_err();
            assert!(error.0.contains(part), "{json}: {}", error.0);
        };
        says("{", "not JSON");
        says("[]", "JSON object");
        says("{}", "'inputs'");
        says(
            r#"{"inputs":[{"name":"a","datatype":"INT64","shape":[1,2],"data":[1]}]}"#,
            "holds 2 values, but its 'data' has 1",
        );
        says(
            r#"{"inputs":[{"name":"a","datatype":"INT64","shape":[1],"data":["x"]}]}"#,
            "not a INT64 value",
        );
        says(
            r#"{"inputs":[{"name":"a","datatype":"INT8","shape":[1],"data":[300]}]}"#,
            "not a INT8 value",
        );
        says(
            r#"{"inputs":[{"name":"a","datatype":"FP16","shape":[1],"data":[1]}]}"#,
            "binary data",
        );
        says(
            r#"{"inputs":[{"name":"a","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":4}}]}"#,
            "only 0 bytes",
        );
        says(
            r#"{"inputs":[{"name":"a","datatype":"FP32","shape":"x","data":[1]}]}"#,
            "'shape'",
        );
        says(
            r#"{"inputs":[{"name":"a","datatype":"FP32","shape":[1]}]}"#,
            "neither",
        );
    }

    #[test]
    fn a_tensor_of_an_unknown_datatype_goes_on_for_the_codec_to_refuse() {
        let (request, _) =
            decode(r#"{"inputs":[{"name":"a","datatype":"FOO","shape":[1],"data":[1]}]}"#).unwrap();
        assert_eq!(request.inputs[0].datatype, "FOO");
    }

    fn response(outputs: Vec<(&str, &str, Vec<i64>, Vec<u8>)>) -> Vec<u8> {
        let mut message = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: "r\"1".into(),
            ..Default::default()
        };
        for (name, datatype, shape, raw) in outputs {
            message.outputs.push(OutputTensor {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                parameters: Parameters::new(),
            });
            message.raw_output_contents.push(Bytes::from(raw));
        }
        message.encode_to_vec()
    }

    #[test]
    fn answers_are_json_unless_an_output_is_asked_for_as_binary() {
        let raw: Vec<u8> = [1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat();
        let wire = response(vec![
            ("y", "FP32", vec![1, 2], raw.clone()),
            ("n", "INT32", vec![1], 7i32.to_le_bytes().to_vec()),
        ]);
        let json = encode_response(&wire, &BinaryOutputs::default()).unwrap();
        assert_eq!(json.header_length, None);
        let value: Value = serde_json::from_slice(&json.body).unwrap();
        assert_eq!(value["id"], "r\"1");
        assert_eq!(value["outputs"][0]["data"], serde_json::json!([1.5, -2.0]));
        assert_eq!(value["outputs"][1]["data"], serde_json::json!([7]));
        let outputs = BinaryOutputs {
            default: false,
            named: vec![("y".into(), true)],
        };
        let mixed = encode_response(&wire, &outputs).unwrap();
        let n = mixed.header_length.unwrap();
        let header: Value = serde_json::from_slice(&mixed.body[..n]).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(header["outputs"][0].get("data").is_none());
        assert_eq!(&mixed.body[n..], &raw[..]);
    }

    #[test]
    fn optional_bodies_may_be_empty() {
        assert!(optional_object(b"  ").unwrap().is_empty());
        assert_eq!(
            optional_object(br#"{"ready":true}"#).unwrap()["ready"],
            true
        );
        assert!(optional_object(b"[1]").is_err());
    }
}
