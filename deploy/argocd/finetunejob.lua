-- Argo CD health check for kubeforge.io/FineTuneJob
-- (argocd-cm: resource.customizations.health.kubeforge.io_FineTuneJob).
-- Written for Argo CD's Lua 5.1 (gopher-lua): no goto, no integer division, no utf8.
-- A training job is Healthy once it has Succeeded, Degraded when it Failed or its spec
-- was refused, Suspended while spec.suspend holds it, and Progressing otherwise.
local hs = { status = "Progressing", message = "Waiting for the KubeForge operator" }

local function condition(st, t)
  if st.conditions == nil then return nil end
  for _, c in ipairs(st.conditions) do
    if c.type == t then return c end
  end
  return nil
end

local st = obj.status
if st == nil then return hs end
local generation = obj.metadata.generation
if st.observedGeneration == nil or (generation ~= nil and st.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local accepted = condition(st, "Accepted")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = "Spec rejected: " .. (accepted.message or accepted.reason or "")
  return hs
end

local phase = st.phase or "Pending"
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  if st.output ~= nil and st.output.uri ~= nil then hs.message = "Succeeded: " .. st.output.uri end
elseif phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition(st, "Failed")
  hs.message = "Failed"
  if failed ~= nil and failed.message ~= nil and failed.message ~= "" then hs.message = "Failed: " .. failed.message end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended"
else
  hs.message = phase
  local checked = condition(st, "DataChecked")
  if checked ~= nil and checked.status == "Unknown" and checked.message ~= nil then
    hs.message = phase .. ": " .. checked.message
  end
  local p = st.progress
  if p ~= nil and p.step ~= nil then
    hs.message = hs.message .. ": step " .. tostring(p.step)
    if p.totalSteps ~= nil then hs.message = hs.message .. "/" .. tostring(p.totalSteps) end
    if p.loss ~= nil then hs.message = hs.message .. ", loss " .. string.format("%.4f", p.loss) end
  end
end
return hs
